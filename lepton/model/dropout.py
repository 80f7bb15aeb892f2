"""Dropout whose masks belong to the samples, not to the worker that computes them (invariant 1).

torch's dropout draws its masks from the process's random generator, one draw per call, in the order
of the slice's rows: the mask sample 17 gets depends on which rank computes it, what precedes it in the
rank's slice and how the slice is cut into micro-batches. Every replica starts from the same generator
state, so with 1 or 3 workers, or other shares, the same step applies other masks and the runs part
(a relative difference of 0.68 after 2 epochs in ``tests/test_dropout.py``, against 1e-7 without).

``KeyedDropout`` replaces ``nn.Dropout`` and ``nn.Dropout1d/2d/3d`` (``convert``, in place; they hold no
state, so state dicts are unchanged). Inside ``keyed`` — the trainer wraps each pass, forward and
backward, in it — element j of the sample at dataset row r is kept when a hash of (job seed, global
step, layer, the layer's call count in the pass, r, j) is at least p: a sample gets the same mask on
any rank, with any neighbours, in any micro-batch, and an activation-checkpointing recompute gets the
forward's masks. Inputs are batch-first: an input whose first dimension is not the pass's sample count
(a sequence-first tensor, time folded into the batch) cannot be keyed and gets torch's dropout, and
so does any call outside ``keyed``. ``unkeyed`` names the random layers it leaves split-dependent.

The hash is a 32-bit integer mixer (hash-prospector's improved lowbias32) computed in int64 torch
arithmetic on the activation's device: every product stays below 2**63 (a value below 2**32 times a
multiplier below 2**31), so nothing relies on overflow.
"""

from __future__ import annotations

import contextlib
import math
from typing import cast

import torch
from torch import nn

_CONVERTIBLE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_TORCH = {
    nn.Dropout: nn.functional.dropout,
    nn.Dropout1d: nn.functional.dropout1d,
    nn.Dropout2d: nn.functional.dropout2d,
    nn.Dropout3d: nn.functional.dropout3d,
}
_M32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) in int64, in place (multipliers below 2**31: no product overflows).
    The shifts write into one scratch tensor: on a large ``x`` allocations cost more than the arithmetic."""
    scratch = torch.empty_like(x)
    x ^= torch.bitwise_right_shift(x, 16, out=scratch)
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x ^= torch.bitwise_right_shift(x, 15, out=scratch)
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    x ^= torch.bitwise_right_shift(x, 15, out=scratch)
    return x


def _key(*parts: int) -> int:
    """splitmix64 over the parts, in Python integers: a 64-bit key for (seed, step, layer, call)."""
    z = 0
    for p in parts:
        z = (z + (p & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


def keep_mask(rows: torch.Tensor, width: int, key: int, p: float, device=None) -> torch.Tensor:
    """(len(rows), width) booleans, True with probability 1 - p; entry (i, j) is a function of
    (key, rows[i], j) alone."""
    lo, hi = key & _M32, key >> 32
    per_row = _mix(_mix((rows.to(device=device, dtype=torch.int64) ^ lo) & _M32) ^ (hi & _M32))
    per_column = _mix((torch.arange(width, dtype=torch.int64, device=device) + (hi >> 1)) & _M32)
    return _mix(per_row[:, None] ^ per_column[None, :]) >= min(round(p * 2**32), 2**32)


class _Pass:
    """The pass in progress. Process-wide, not per thread: autograd may run a checkpoint's recompute
    on its own device thread during ``backward``; a worker runs one pass at a time."""

    seed: int = 0
    step: int = 0
    rows: torch.Tensor | None = None  # the dataset rows of the pass's samples, None outside ``keyed``
    calls: dict | None = None  # layer → keyed calls in this pass's forward
    missed: set | None = None  # layers that could not be keyed in this pass (``batch_first``)


_pass = _Pass()


@contextlib.contextmanager
def keyed(seed: int, step: int, rows):
    """One pass — forward and backward — over the samples at dataset ``rows`` of global step ``step``."""
    saved = (_pass.seed, _pass.step, _pass.rows, _pass.calls, _pass.missed)
    _pass.seed, _pass.step, _pass.calls, _pass.missed = int(seed), int(step), {}, set()
    _pass.rows = torch.as_tensor(rows, dtype=torch.int64)
    try:
        yield
    finally:
        _pass.seed, _pass.step, _pass.rows, _pass.calls, _pass.missed = saved


class KeyedDropout(nn.Module):
    """Dropout with per-sample masks (module doc): per element as ``nn.Dropout``, or per (sample,
    channel) as ``nn.Dropout1d/2d/3d`` (``kind``, the layer it replaces)."""

    layer = 0  # its place among the model's keyed layers (``convert``): in the key

    def __init__(
        self, p: float, kind: type[nn.modules.dropout._DropoutNd] = nn.Dropout, inplace: bool = False
    ):
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
            if rows is not None:  # inside ``keyed``: ``missed`` is a set
                cast(set, _pass.missed).add(self.layer)
            return _TORCH[self.kind](x, self.p, True, self.inplace)  # not keyable: torch's dropout
        key = _key(_pass.seed, _pass.step, self.layer, self._call())
        shape = tuple(x.shape[:2] if self.channels else x.shape)
        keep = keep_mask(rows, math.prod(shape[1:]), key, self.p, x.device).reshape(
            shape + (1,) * (x.dim() - len(shape))
        )
        y = x.mul_(keep) if self.inplace else x.mul(keep)
        return y.mul_(1.0 / (1.0 - self.p)) if self.p < 1.0 else y

    def _call(self) -> int:
        """Which call of this layer in the pass. A recompute in the backward pass (activation
        checkpointing) repeats a forward call: for a layer called once per pass that is call 1; which
        call a layer called several times repeats cannot be known, and guessing would pair the
        gradient with another mask than the forward's, so that is refused."""
        calls = cast(dict, _pass.calls)  # called inside ``keyed`` only (forward: rows is set)
        if torch._C._current_graph_task_id() == -1:  # the forward pass
            calls[self.layer] = calls.get(self.layer, 0) + 1
            return calls[self.layer]
        if calls.get(self.layer, 0) > 1:
            raise RuntimeError(
                f"a dropout layer ({self.kind.__name__}) called {calls[self.layer]} times in one"
                " forward pass is recomputed by activation checkpointing: give each call its own"
                " dropout module"
            )
        return 1


def convert(model: nn.Module) -> int:
    """Swap the model's dropout layers (exactly these types: a subclass may do more) for
    ``KeyedDropout`` in place and number them; how many it has then."""
    _swap(model)
    layers = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    for i, m in enumerate(layers):
        m.layer = i
    return len(layers)


def _swap(model: nn.Module, done: dict | None = None) -> None:
    done = {} if done is None else done  # a module registered twice is swapped for one layer
    for name, child in list(model._modules.items()):  # named_children skips a second registration
        if type(child) in _CONVERTIBLE:
            if id(child) not in done:
                drop = cast(nn.modules.dropout._DropoutNd, child)  # its type is one of _CONVERTIBLE
                done[id(child)] = KeyedDropout(drop.p, type(drop), drop.inplace).train(drop.training)
            setattr(model, name, done[id(child)])
        elif child is not None and not isinstance(child, KeyedDropout):
            _swap(child, done)


def unkeyed(model: nn.Module) -> list[str]:
    """The model's random layers whose draws still depend on the split: dropout types it does not
    convert, attention and recurrent layers with dropout (they call ``F.dropout`` inside)."""
    names = set()
    for m in model.modules():
        p = getattr(m, "dropout", 0)
        if isinstance(m, nn.modules.dropout._DropoutNd) and type(m) not in _CONVERTIBLE and m.p > 0:
            names.add(type(m).__name__)
        elif isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and isinstance(p, float) and p > 0:
            names.add(f"{type(m).__name__}(dropout={p:g})")
    return sorted(names)


def batch_first(model: nn.Module, input_shape: tuple[int, ...], rows: int = 3) -> list[str]:
    """The converted layers that a training-mode forward of ``rows`` zero samples does not give a
    batch-first input (so they fall back to torch's dropout), named as ``Dropout #k``. Runs the model
    in training mode — call it on a copy (running statistics move)."""
    was = model.training
    try:
        with torch.no_grad(), keyed(0, 0, list(range(rows))):
            model.train()(torch.zeros((rows,) + tuple(input_shape)))
            missed = sorted(cast(set, _pass.missed))  # inside ``keyed``: a set
    except Exception:  # a model that cannot run on zeros is the other checks' business
        return []
    finally:
        model.train(was)
    layers = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    return [f"{layers[k].kind.__name__} #{k}" for k in missed]
