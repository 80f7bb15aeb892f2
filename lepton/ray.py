"""Lepton on a Ray cluster: ``lepton.ray.train(job, num_workers=N, resources_per_worker={...})``
(launch/ray_engine.py). Needs ``pip install 'lepton[ray]'``."""

from .launch.ray_engine import RayResult, train

__all__ = ["RayResult", "train"]
