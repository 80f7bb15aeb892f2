"""Batch normalisation over the global batch, so that a model with BatchNorm layers is the same model
whatever the worker count and the shares (design invariant 1).

A BatchNorm layer in training mode normalises with the mean and variance of the batch it sees. In data
parallel each rank sees only its slice: per-rank statistics make the result depend on how the global
batch was split (DDP's default behaviour), and the replicas' running statistics drift apart. torch's
``SyncBatchNorm`` reduces the statistics across ranks but runs on GPUs only. ``GlobalBatchNorm`` does
the same math with the generation's own ``allreduce`` (shared memory on one host, gloo or NCCL
otherwise): in the forward pass each rank adds its per-channel count, sum and sum of squares (float64,
so that E[x²] − E[x]² does not cancel), in the backward pass the two per-channel sums the input
gradient needs, Σdy and Σdy·x̂. Every rank then normalises with the statistics of the whole global
batch, and the weight and bias gradients are each rank's own sums, added up by the step's gradient
reduction like every other gradient.

Contract:
- with ``model.batch_norm: global`` (the default; ``local`` leaves BatchNorm as it is: per-rank
  statistics, as in DDP without SyncBatchNorm) the trainer calls ``convert(model)``, which swaps every
  ``BatchNorm1d/2d/3d`` that tracks running statistics for a ``GlobalBatchNorm`` holding the same
  parameter and buffer objects under the same names (checkpoints, the final model and exported
  artifacts keep plain BatchNorm layers' state dicts); call it before the optimizer is built;
- in training mode every forward *and* backward pass of such a layer is a collective: the trainer runs a
  step's forward and backward inside ``reducing(group)``, and every rank makes the same passes in the
  same order — one per step, so no micro-batches (the spec refuses ``cluster.max_micro_batch`` for such a
  model), and a rank whose slice is empty still makes its pass;
- outside ``reducing`` (a forward in training mode that is not a step) it uses its own batch's
  statistics, as BatchNorm does; evaluation mode uses the running statistics: no collective.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError

# the generation group of the step this thread is computing; the forward pass runs in the thread that
# called it, and hands the group to its backward (which autograd may run on another thread) in ``ctx``
_local = threading.local()


@contextmanager
def reducing(group):
    """The global-batch statistics of the passes run inside come from ``group`` (a ``GenerationGroup``)."""
    previous = getattr(_local, "group", None)
    _local.group = group
    try:
        yield
    finally:
        _local.group = previous


def _sum_over_ranks(group, t: torch.Tensor) -> None:
    if group is not None:
        group.allreduce(t)


class _GlobalNorm(torch.autograd.Function):
    """y = x̂·weight + bias with x̂ = (x − mean) / sqrt(var + eps) over the global batch; also returns
    the batch mean, the biased variance and the global count (for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):
        c, dims = x.shape[1], [0] + list(range(2, x.dim()))
        n = x.numel() // c
        stats = torch.zeros(1 + 2 * c, dtype=torch.float64, device=x.device)
        if n:
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            m = mean.double()
            stats[0] = n
            stats[1:1 + c] = n * m
            stats[1 + c:] = n * (var.double() + m * m)
        _sum_over_ranks(group, stats)
        total = float(stats[0])
        if total < 2:       # every rank holds the same count, so every rank raises
            raise ValueError(f"BatchNorm needs more than 1 value per channel when training (the global"
                             f" batch has {int(total)})")
        mean = stats[1:1 + c] / total
        var = (stats[1 + c:] / total - mean * mean).clamp_min(0)
        shape = [1, c] + [1] * (x.dim() - 2)
        invstd = (var + eps).rsqrt().to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        y = xhat * weight.view(shape) + bias.view(shape) if weight is not None else xhat
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total, ctx.group, ctx.dims, ctx.shape = total, group, dims, shape
        count = stats[0].clone()
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):
        xhat, weight, invstd = ctx.saved_tensors
        c, dims, shape = xhat.shape[1], ctx.dims, ctx.shape
        sums = torch.zeros(2 * c, dtype=torch.float64, device=dy.device)
        if dy.numel():
            sums[:c] = dy.sum(dims).double()
            sums[c:] = (dy * xhat).sum(dims).double()
        own = sums.clone()           # this rank's Σdy, Σdy·x̂: its bias and weight gradients
        _sum_over_ranks(ctx.group, sums)
        mean_dy = (sums[:c] / ctx.total).to(dy.dtype).view(shape)
        mean_dy_xhat = (sums[c:] / ctx.total).to(dy.dtype).view(shape)
        scale = invstd if weight is None else invstd * weight
        dx = (dy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)
        dweight = own[c:].to(dy.dtype) if weight is not None else None
        dbias = own[:c].to(dy.dtype) if weight is not None else None
        return dx, dweight, dbias, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (module doc)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (batch, channels, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        y, mean, var, count = _GlobalNorm.apply(x, self.weight, self.bias, self.eps, getattr(_local, "group", None))
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            n = float(count)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var * n / (n - 1)).to(self.running_var.dtype), alpha=m)
        return y


_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert(model: nn.Module) -> int:
    """Swap the model's BatchNorm layers for ``GlobalBatchNorm`` in place (module doc); how many."""
    swapped = 0
    for name, child in model.named_children():
        if type(child) in _CONVERTIBLE and child.track_running_stats:
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, True)
            # the same objects: the optimizer, the state dict and tied references all see one tensor
            new.weight, new.bias = child.weight, child.bias
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, buf, getattr(child, buf))
            new.train(child.training)
            setattr(model, name, new)
            swapped += 1
        else:
            swapped += convert(child)
    return swapped


def check_micro_batches(max_micro_batch: int | None, model: nn.Module) -> None:
    """Micro-batches would normalise each part with its own statistics (and give ranks with different
    shares different numbers of collective passes): refused for a model with BatchNorm layers."""
    if max_micro_batch and any(type(m) in _CONVERTIBLE or isinstance(m, GlobalBatchNorm) for m in model.modules()):
        raise SpecError("cluster.max_micro_batch: the model has BatchNorm layers, which normalise over the whole"
                        " global batch in one pass per worker (model.batch_norm: global); micro-batches would"
                        " change that (remove max_micro_batch, or set model.batch_norm: local)")
