"""Network communication: one process group per generation, exact gradient reduction, state broadcast."""

from .errors import Unreachable
from .flat_grads import FlatGradients
from .group import CommError, GenerationGroup

__all__ = ["CommError", "GenerationGroup", "FlatGradients", "Unreachable"]
