"""Network communication: one process group per generation, exact gradient reduction, state broadcast."""
from .group import CommError, GenerationGroup
from .reducer import FlatGradients

__all__ = ["CommError", "GenerationGroup", "FlatGradients"]
