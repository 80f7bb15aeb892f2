"""A user model module for the ``model.factory: module:function`` tests."""
from torch import nn


def build(input_shape, num_outputs):
    return nn.Sequential(nn.Linear(input_shape[0], 12), nn.ReLU(), nn.Linear(12, num_outputs))
