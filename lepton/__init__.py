"""Lepton: distributed data-parallel training with a coordinator and elastic workers.

Public API: ``train``, ``load``, ``JobSpec``, ``LeptonError``. Everything else is internal.
"""

from .api import TrainResult, load, train
from .errors import LeptonError
from .predict import Predictor
from .spec import JobSpec

__all__ = ["train", "load", "JobSpec", "LeptonError", "Predictor", "TrainResult"]
__version__ = "0.1.0"
