"""Metrics computed from sums that workers reduce exactly (so any split of the rows gives the same
numbers as one process)."""
from __future__ import annotations

import math

import torch

# Order of the sums a worker accumulates per split; the reduction adds them elementwise.
CLASSIFICATION_SUMS = ("loss", "correct", "count")
REGRESSION_SUMS = ("loss", "abs_err", "sum_y", "sum_y2", "count")


def batch_sums(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 vector of sums for one batch (see the tuples above)."""
    if task == "classification":
        loss = torch.nn.functional.cross_entropy(out, y, reduction="sum")
        correct = (out.argmax(1) == y).sum()
        return torch.stack([loss.double(), correct.double(), torch.tensor(float(len(y)), dtype=torch.float64)])
    pred = out.reshape(-1)
    yd = y.double()
    err = pred.double() - yd
    return torch.stack([(err * err).sum(), err.abs().sum(), yd.sum(), (yd * yd).sum(),
                        torch.tensor(float(len(y)), dtype=torch.float64)])


def empty_sums(task: str) -> torch.Tensor:
    return torch.zeros(len(CLASSIFICATION_SUMS if task == "classification" else REGRESSION_SUMS),
                       dtype=torch.float64)


def finish(task: str, sums: torch.Tensor) -> dict:
    s = sums.tolist()
    n = s[-1]
    if n == 0:
        return {"count": 0}
    if task == "classification":
        return {"loss": s[0] / n, "accuracy": s[1] / n, "count": int(n)}
    sse, sae, sy, sy2 = s[:4]
    sst = sy2 - sy * sy / n
    return {"loss": sse / n, "mse": sse / n, "mae": sae / n,
            "r2": 1.0 - sse / sst if sst > 0 else math.nan, "count": int(n)}


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss as a SUM over the batch (design invariant 1: divide by B after reduction)."""
    if task == "classification":
        return torch.nn.functional.cross_entropy(out, y, reduction="sum")
    return torch.nn.functional.mse_loss(out.reshape(-1), y, reduction="sum")
