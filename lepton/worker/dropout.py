"""Dropout whose masks belong to the samples, not to the worker that computes them (invariant 1).

torch's dropout draws its masks from the process's random generator, one draw per call, in the order
of the slice's rows: the mask sample 17 gets depends on which rank computes it, what precedes it in the
rank's slice and how the slice is cut into micro-batches. Every replica starts from the same generator
state, so with 1, 2 or 3 workers, or other shares, the same step applies other masks and the runs part
(a relative difference of 0.3 after 40 steps on a small MLP, against 1e-7 without dropout).

``KeyedDropout`` replaces ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` (``convert``, in place; they hold no
state, so state dicts are unchanged). In a training step it draws each mask element from a counter-based
hash (splitmix64) of (job seed, global step, the sample's dataset row, the call's place in the
forward pass, the element): a sample gets the same mask wherever and with whatever neighbours it is computed.
The trainer names the step and the rows of each pass with ``keyed``; outside it (a model called in
training mode by other code) the layer is torch's dropout. Random layers it cannot key —
``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``, ``F.dropout`` called in a ``forward`` — still draw from
torch's generator; ``unkeyed`` names the first two so the worker can say the run depends on the split.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from torch import nn

_CONVERTIBLE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_UNKEYABLE = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise, modulo 2**64 (numpy's unsigned arrays wrap silently)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    z = np.zeros(1, dtype=np.uint64)
    for p in parts:
        z = _mix(z + np.uint64(p & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
    return z[0]


def uniform(rows: np.ndarray, width: int, key: np.uint64) -> np.ndarray:
    """(len(rows), width) float32 numbers in [0, 1): element j of row r is a function of (key, r, j)
    alone — the j-th output of a splitmix64 stream seeded from (key, r)."""
    seeds = _mix(rows.astype(np.uint64) * _GOLDEN + key)
    z = _mix(seeds[:, None] + (np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)    # 24 bits: float32 exact


class _Pass(threading.local):
    key: np.uint64 | None = None     # (seed, step) of the pass being computed, None outside ``keyed``
    rows: np.ndarray | None = None   # the dataset rows of the pass's samples, in input order
    calls: int = 0                   # keyed dropout calls so far in this pass


_pass = _Pass()


@contextlib.contextmanager
def keyed(seed: int, step: int, rows: np.ndarray):
    """One forward (and its backward) of the samples at dataset ``rows`` in global step ``step``."""
    _pass.key, _pass.rows, _pass.calls = _key(seed, step), np.asarray(rows, dtype=np.int64), 0
    try:
        yield
    finally:
        _pass.key, _pass.rows = None, None


class KeyedDropout(nn.Module):
    """Dropout with per-sample masks (module doc): per element as ``nn.Dropout``, or per (sample,
    channel) as ``nn.Dropout1d/2d/3d`` (``kind``, the layer it replaces)."""

    def __init__(self, p: float, kind: type = nn.Dropout, inplace: bool = False):
        super().__init__()
        self.p, self.kind, self.inplace = p, kind, inplace
        self.channels = kind is not nn.Dropout

    def extra_repr(self) -> str:
        return f"p={self.p}, as {self.kind.__name__}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = _pass.rows
        if rows is None or x.dim() < (3 if self.channels else 1) or x.shape[0] != len(rows):
            return _TORCH[self.kind](x, self.p, True, self.inplace)     # not a keyed pass: torch's dropout
        _pass.calls += 1            # the forward's calls come in the same order on every rank
        shape = x.shape[:2] if self.channels else x.shape
        width = int(np.prod(shape[1:], dtype=np.int64))
        u = uniform(rows, width, _key(int(_pass.key), _pass.calls))
        keep = torch.from_numpy(u >= np.float32(self.p)).reshape(tuple(shape) + (1,) * (x.dim() - len(shape)))
        scale = keep.to(device=x.device, dtype=x.dtype) * (1.0 / (1.0 - self.p)) if self.p < 1.0 else \
            torch.zeros_like(keep, dtype=x.dtype, device=x.device)
        return x.mul_(scale) if self.inplace else x * scale


_TORCH = {nn.Dropout: nn.functional.dropout, nn.Dropout1d: nn.functional.dropout1d,
          nn.Dropout2d: nn.functional.dropout2d, nn.Dropout3d: nn.functional.dropout3d}


def convert(model: nn.Module) -> int:
    """Swap the model's dropout layers for ``KeyedDropout`` in place; how many it has then."""
    for name, child in model.named_children():
        if type(child) in _CONVERTIBLE:
            new = KeyedDropout(child.p, type(child), child.inplace)
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert(child)
    return sum(isinstance(m, KeyedDropout) for m in model.modules())


def unkeyed(model: nn.Module) -> list[str]:
    """The type names of the model's random layers that ``convert`` cannot key."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, _UNKEYABLE)})
