"""Batch normalisation over the global batch, so that a model with BatchNorm layers is the same model
whatever the worker count and the shares (invariant 1).

A BatchNorm layer in training mode normalises with the mean and variance of the batch it sees. In data
parallel each rank sees only its slice: per-rank statistics make the result depend on how the global
batch was split (DDP's default behaviour), and the replicas' running statistics drift apart. torch's
``SyncBatchNorm`` reduces the statistics across ranks but runs on GPUs only. ``GlobalBatchNorm`` does
the same math with the generation's own ``allreduce`` (shared memory on one host, gloo or NCCL
otherwise): in the forward pass each rank adds its per-channel sum and sum of squares (float64, so
that E[x²] − E[x]² does not cancel; the global count is known on the host from the step's batch size,
so nothing waits on a device), in the backward pass the two per-channel sums the input gradient
needs, Σdy and Σdy·x̂. Every rank then normalises with the statistics of the whole global batch, and the
weight and bias gradients are each rank's own sums, added up by the step's gradient reduction like
every other gradient. The element-wise passes are torch's fused BatchNorm kernels in evaluation form
(fed the global statistics); with one worker the layer is torch's BatchNorm itself.

Cost: two collectives per layer per step, each a point where the ranks line up. Measured with
``benchmarks/batchnorm.py`` (3-BatchNorm CNN, 2 workers on 2 cores): none at 128 samples per worker,
~30% of the throughput at 32 per worker, where each layer's compute is shorter than a barrier.

Contract:
- with ``model.batch_norm: global`` (the default; ``local`` leaves BatchNorm as it is: per-rank
  statistics, as in DDP without SyncBatchNorm) ``prepare`` swaps every ``BatchNorm1d/2d/3d`` and
  ``SyncBatchNorm`` that tracks running statistics for a ``GlobalBatchNorm`` holding the same parameter
  and buffer objects under the same names (checkpoints, the final model and exported artifacts keep
  plain BatchNorm state dicts), before the optimizer is built; any other BatchNorm (a subclass, a lazy
  one, one without running statistics) is a ``SpecError`` rather than silently per-rank;
- in training mode every forward *and* backward pass of such a layer is a collective: the trainer runs a
  step's forward and backward inside ``reducing(group, batch)``, and every rank makes the same passes in
  the same order — one per step, so no micro-batches (refused), and a rank whose slice is empty still
  makes its pass. Each collective carries a sequence tag; ranks whose passes do not pair up (a model
  that calls its layers a data-dependent number of times) fail the step instead of mixing statistics
  (``step_totals``). The time spent in these collectives is taken out of the compute window the
  balancer measures (``step_totals``);
- outside ``reducing`` (a forward in training mode that is not a step) it uses its own batch's
  statistics, as BatchNorm does; evaluation mode uses the running statistics: no collective.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError

_BN = nn.modules.batchnorm._BatchNorm
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _Totals:
    """What the passes of one step did: collectives made, their wall and processor seconds, and a
    device flag set when the ranks' passes did not pair up."""

    def __init__(self):
        self.calls, self.wall, self.cpu, self.mismatched = 0, 0.0, 0.0, None


class _Step(threading.local):
    """The step this thread is computing: its generation group, global batch size and totals. The
    forward pass runs in the thread that called it and hands them to its backward (which autograd may
    run on another thread) in ``ctx``."""

    group = None
    batch = 0
    totals = _Totals()


_step = _Step()


@contextmanager
def reducing(group, batch: int):
    """The training passes run inside normalise over the global batch of ``batch`` samples, reduced
    over ``group`` (a ``GenerationGroup``; None: each rank's own batch)."""
    previous = (_step.group, _step.batch, _step.totals)
    _step.group, _step.batch, _step.totals = group, batch, _Totals()
    try:
        yield
    finally:
        _step.group, _step.batch = previous[:2]  # the totals stay readable (step_totals)


def step_totals() -> tuple[float, float, bool]:
    """Wall and processor seconds the last step spent in BatchNorm collectives, and whether some rank's
    passes did not pair up with the others' (every rank sees it: the tags are reduced too)."""
    t = _step.totals
    return t.wall, t.cpu, t.mismatched is not None and bool(t.mismatched)


def _reduce(group, t: torch.Tensor, tag: float, totals: _Totals) -> None:
    """Sum ``t`` (whose last slot holds ``tag``) over the ranks; a reduced tag other than world × tag
    means the ranks paired different passes."""
    w0, c0 = time.perf_counter(), time.process_time()
    group.allreduce(t)
    totals.wall += time.perf_counter() - w0
    totals.cpu += time.process_time() - c0
    if t.device.type == "cpu":
        bad = t.numpy()[-1] != tag * group.world
        totals.mismatched = bool(totals.mismatched) or bad
    else:  # stays on the device: read once per step
        bad = t[-1] != tag * group.world
        totals.mismatched = bad if totals.mismatched is None else (totals.mismatched | bad)


def _tag(call: int, layer: int) -> float:
    """Which pass of the step (its ordinal) on which layer: ranks must pair the same ones."""
    return float(call * 4096 + layer % 4096)


def _count(x: torch.Tensor, batch: int) -> int:
    """Values per channel in the global batch: every rank's slice has the same per-sample shape."""
    return batch * math.prod(x.shape[2:])


# The per-channel arithmetic around the two collectives, in float64. Two implementations of the same
# formulas: on the host in numpy (a numpy call costs ~1 µs where a torch call on a small CPU tensor costs
# 3–5 µs, and a layer makes ~20 of them per step: most of this layer's overhead on small batches), on a
# device in torch (the values stay there: no host synchronisation per layer).


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS  # (numpy has no bfloat16)


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _global_stats(x: torch.Tensor, n: int, total: int, group, tag: float, totals: _Totals):
    """This rank's ``n`` values per channel → the global batch's mean and biased variance (x's dtype),
    and the unbiased variance for the running statistics."""
    c = x.shape[1]
    local = torch.batch_norm_update_stats(x, None, None, 0.0) if n else None  # mean, biased variance
    if _on_host(x):
        s = np.zeros(2 * c + 1)
        if local is not None:  # per-rank sums Σx = n·mean, Σx² = n·(var + mean²)
            s[:c], s[c:-1] = local[0].numpy(), local[1].numpy()
            s[c:-1] += s[:c] * s[:c]
            s[:-1] *= n
        s[-1] = tag
        _reduce(group, torch.from_numpy(s), tag, totals)
        mean, sq = s[:c] / total, s[c:-1] / total
        var = np.maximum(sq - mean * mean, 0.0)
        out = torch.from_numpy(np.concatenate([mean, var, var * (total / (total - 1))])).to(x.dtype)
    else:  # the same in torch (names of their own: the host branch's are numpy arrays)
        st = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        if local is not None:
            m = torch.cat(local).double()
            st[:c], st[c:-1] = m[:c] * n, torch.addcmul(m[c:], m[:c], m[:c]).mul_(n)
        st[-1] = tag
        _reduce(group, st, tag, totals)
        mean_t = st[:c] / total
        var_t = (st[c:-1] / total - mean_t * mean_t).clamp_min(0)
        out = torch.cat([mean_t, var_t, var_t * (total / (total - 1))]).to(x.dtype)
    return out[:c], out[c : 2 * c], out[2 * c :]


def _input_grad_terms(gb, gw, weight, mean, var, eps: float, total: int, group, tag: float, totals: _Totals):
    """This rank's Σdy (``gb``) and Σdy·x̂ (``gw``) → per-channel (b, a) such that the input gradient
    is dx = dy·w·invstd − b·x − a over the global batch:
    dx = k·(dy − mean(dy) − x̂·mean(dy·x̂)) with k = w·invstd, so b = k·invstd·mean(dy·x̂) and
    a = k·mean(dy) − b·mean."""
    c = gb.shape[0]
    if _on_host(gb):
        s = np.empty(2 * c + 1)
        s[:c], s[c:-1], s[-1] = gb.numpy(), gw.numpy(), tag
        _reduce(group, torch.from_numpy(s), tag, totals)
        invstd = 1.0 / np.sqrt(var.numpy().astype(np.float64) + eps)
        k = invstd if weight is None else weight.detach().numpy() * invstd
        b = k * invstd * (s[c:-1] / total)
        a = k * (s[:c] / total) - b * mean.numpy()
        out = torch.from_numpy(np.concatenate([b, a])).to(gb.dtype)
    else:
        st = torch.cat([gb.double(), gw.double(), torch.tensor([tag], dtype=torch.float64, device=gb.device)])
        _reduce(group, st, tag, totals)
        invstd = (var.double() + eps).rsqrt()
        k = invstd if weight is None else weight.detach().double() * invstd
        b = k * invstd * (st[c:-1] / total)
        a = k * (st[:c] / total) - b * mean.double()
        out = torch.cat([b, a]).to(gb.dtype)
    return out[:c], out[c:]


class _GlobalNorm(torch.autograd.Function):
    """y = (x − mean) / sqrt(var + eps) · weight + bias with the global batch's mean and (biased)
    variance; also returns the mean and the unbiased variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group, batch: int, totals: _Totals, layer: int):
        c = x.shape[1]
        total = _count(x, batch)
        if total < 2:  # every rank knows the same count: every rank raises
            raise ValueError(
                f"BatchNorm needs more than 1 value per channel when training (this step's global"
                f" batch has {total})"
            )
        mean, var, unbiased = _global_stats(
            x, x.numel() // c, total, group, _tag(totals.calls, layer), totals
        )
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)  # torch's fused pass
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.total, ctx.group, ctx.totals, ctx.layer = eps, total, group, totals, layer
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, weight, mean, var = ctx.saved_tensors
        if x.numel():
            # evaluation-form backward, fused: dy·w·invstd and this rank's Σdy·x̂, Σdy
            w = weight if weight is not None else torch.ones_like(mean)
            gi, gw, gb = torch.ops.aten.native_batch_norm_backward(
                dy, x, w, mean, var, None, None, False, ctx.eps, [True, True, True]
            )
        else:  # (that kernel divides by zero on an empty batch)
            gi, gw, gb = torch.zeros_like(x), torch.zeros_like(mean), torch.zeros_like(mean)
        ctx.totals.calls += 1
        tag = -_tag(ctx.totals.calls, ctx.layer)
        b, a = _input_grad_terms(gb, gw, weight, mean, var, ctx.eps, ctx.total, ctx.group, tag, ctx.totals)
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        dx = torch.addcmul(gi, x, b.view(shape), value=-1).sub_(a.view(shape))
        return (
            dx,
            (gw if weight is not None else None),
            (gb if weight is not None else None),
            None,
            None,
            None,
            None,
            None,
        )


class GlobalBatchNorm(_BN):
    """BatchNorm whose training statistics are those of the global batch (module doc)."""

    layer = 0  # its place among the model's global BatchNorm layers (``convert``): in the tags

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (batch, channels, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = _step.group
        if not self.training or group is None or group.world == 1:
            return super().forward(x)  # torch's BatchNorm: running statistics, or its own batch
        self._check_input_dim(x)
        _step.totals.calls += 1
        y, mean, unbiased = _GlobalNorm.apply(
            x, self.weight, self.bias, self.eps, group, _step.batch, _step.totals, self.layer
        )
        with torch.no_grad():  # as torch's BatchNorm, from the global statistics
            self.num_batches_tracked.add_(1)
            m = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum  # no host sync
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y


def convert(model: nn.Module) -> int:
    """Swap the model's convertible BatchNorm layers for ``GlobalBatchNorm`` in place; how many global
    layers it has then (layers converted before count too: a factory may hand out one instance)."""
    _swap(model)
    layers = [m for m in model.modules() if isinstance(m, GlobalBatchNorm)]
    for i, m in enumerate(layers):
        m.layer = i
    return len(layers)


def _swap(model: nn.Module) -> None:
    for name, child in model.named_children():
        if type(child) in _CONVERTIBLE and child.track_running_stats:
            bn = cast(_BN, child)  # its type is one of _CONVERTIBLE
            new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, True)
            # the same objects: the optimizer, the state dict and tied references all see one tensor
            new.weight, new.bias = bn.weight, bn.bias
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, buf, getattr(bn, buf))
            new.train(bn.training)
            setattr(model, name, new)
        else:
            _swap(child)


def prepare(model: nn.Module, mode: str, max_micro_batch: int | None) -> bool:
    """``model.batch_norm: global``: convert the model (in place) and check that it can be trained so;
    True when it has global BatchNorm layers (its steps then make collective passes)."""
    if mode != "global":
        return False
    swapped = convert(model)
    left = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, _BN) and not isinstance(m, GlobalBatchNorm)
        }
    )
    if left:
        raise SpecError(
            f"model.batch_norm: global normalises BatchNorm1d/2d/3d and SyncBatchNorm layers that track"
            f" running statistics over the global batch; this model also has {', '.join(left)}, which"
            " would stay per worker: set model.batch_norm: local (or use those layer types)"
        )
    if swapped and max_micro_batch:
        raise SpecError(
            "cluster.max_micro_batch: the model has BatchNorm layers, which normalise over the whole"
            " global batch in one pass per worker (model.batch_norm: global); micro-batches would"
            " change that (remove max_micro_batch, or set model.batch_norm: local)"
        )
    return swapped > 0


def check_last_step(model: nn.Module, input_shape: tuple[int, ...], train_rows: int, batch_size: int) -> None:
    """A step of one sample cannot be batch-normalised where a layer sees one value per channel (an
    (N, C) input): when every epoch ends with such a step (no drop_last), refuse the batch size now
    rather than fail after the first epoch."""
    if not any(isinstance(m, _BN) for m in model.modules()) or (
        train_rows % batch_size != 1 and batch_size != 1
    ):
        return
    was = model.training
    try:
        with torch.no_grad():
            model.train()(torch.zeros((1,) + tuple(input_shape)))
    except Exception as e:  # only that one answer matters here; any other failure shows in training
        if not (isinstance(e, ValueError) and "more than 1 value per channel" in str(e)):
            return
        raise SpecError(
            f"train.batch_size: {batch_size} leaves 1 sample for the last step of every epoch"
            f" ({train_rows} training rows), and the model's BatchNorm cannot normalise one sample in"
            " training; choose another batch size"
        ) from None
    finally:
        model.train(was)
