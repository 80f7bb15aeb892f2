"""A user model module for the ``model.factory: module:function`` tests."""

import torch
from torch import nn


def build(input_shape, num_outputs):
    return nn.Sequential(nn.Linear(input_shape[0], 12), nn.ReLU(), nn.Linear(12, num_outputs))


def build_bn(input_shape, num_outputs):
    """With BatchNorm: its statistics must be the global batch's for invariant 1 to hold. No bias before
    it, as usual: BatchNorm cancels such a bias, so its gradient is rounding noise, which Adam scales up
    to full-size steps that differ with the summation order (the model's outputs would not)."""
    return nn.Sequential(
        nn.Linear(input_shape[0], 12, bias=False), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, num_outputs)
    )


class _WithMask(nn.Module):
    """build_bn's model plus a buffer that holds -inf by design (as a causal attention mask does)."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.net = build_bn(input_shape, num_outputs)
        self.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1))

    def forward(self, x):
        return self.net(x)


def build_bn_masked(input_shape, num_outputs):
    return _WithMask(input_shape, num_outputs)


def build_dropout(input_shape, num_outputs):
    """Element and channel dropout: their masks must follow the samples for invariant 1 to hold."""
    return nn.Sequential(
        nn.Linear(input_shape[0], 24),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Unflatten(1, (6, 4)),
        nn.Dropout1d(0.2),
        nn.Flatten(),
        nn.Linear(24, num_outputs),
    )


def build_alpha_dropout(input_shape, num_outputs):
    return nn.Sequential(
        nn.Linear(input_shape[0], 8), nn.SELU(), nn.AlphaDropout(0.1), nn.Linear(8, num_outputs)
    )


class _Checkpointed(nn.Sequential):
    """build_dropout's layers under activation checkpointing: the backward recomputes the forward,
    dropout included, and must draw the same masks."""

    def forward(self, x):
        if not torch.is_grad_enabled():
            return super().forward(x)
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)


def build_dropout_checkpointed(input_shape, num_outputs):
    return _Checkpointed(*build_dropout(input_shape, num_outputs))
