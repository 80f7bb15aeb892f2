"""Network communication: one process group per generation, exact gradient reduction, state broadcast."""
from .group import CommError, GenerationGroup
from .flat_grads import FlatGradients

__all__ = ["CommError", "GenerationGroup", "FlatGradients"]
