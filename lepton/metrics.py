"""Metrics computed from sums that workers reduce exactly, so any split of the rows gives the same
numbers as one process.

Classification sums: loss, count, the confusion matrix (C×C counts, rows = true class) and, for two
classes, histograms of the score for each true class (``AUC_BINS`` bins), from which ROC-AUC is computed
(ties within a bin count one half). The score is the logit margin (positive minus negative logit, the
same order as the positive-class probability) through asinh: bins of the probability itself put every
confident prediction (a margin above ~8) into the top bin, where ties made a 0.996 classifier read
0.955; asinh keeps bins ~0.002 wide near a margin of 0 and ~0.1 wide at 50. Precision, recall and F1 are
macro averages over all C classes, a class absent from both labels and predictions counting 0
(sklearn's ``labels=range(C)``). Every sum is a count or a float64 sum, so the reduction is
order-independent up to float64 rounding of the loss.
"""

from __future__ import annotations

import math

import torch

AUC_BINS = 4096
AUC_MARGIN = 64.0  # logit margins beyond ±this share the end bins
REGRESSION_SUMS = ("loss", "abs_err", "sum_y", "sum_y2", "count")


def sums_size(task: str, classes: int) -> int:
    if task != "classification":
        return len(REGRESSION_SUMS)
    return 2 + classes * classes + (2 * AUC_BINS if classes == 2 else 0)


def empty_sums(task: str, classes: int) -> torch.Tensor:
    return torch.zeros(sums_size(task, classes), dtype=torch.float64)


def batch_sums(task: str, out: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """float64 vector of sums for one batch (layout: see ``finish``)."""
    if task != "classification":
        pred = out.reshape(-1)
        yd = y.double()
        err = pred.double() - yd
        return torch.stack(
            [
                (err * err).sum(),
                err.abs().sum(),
                yd.sum(),
                (yd * yd).sum(),
                torch.tensor(float(len(y)), dtype=torch.float64),
            ]
        )
    loss = torch.nn.functional.cross_entropy(out, y, reduction="sum").double().reshape(1)
    count = torch.tensor([float(len(y))], dtype=torch.float64)
    confusion = torch.bincount(y * classes + out.argmax(1), minlength=classes * classes).double()
    parts = [loss, count, confusion]
    if classes == 2:
        margin = out[:, 1].double() - out[:, 0].double()
        u = torch.asinh(margin.clamp(-AUC_MARGIN, AUC_MARGIN)) / math.asinh(AUC_MARGIN)  # in [-1, 1]
        b = torch.clamp(((u + 1) / 2 * AUC_BINS).long(), 0, AUC_BINS - 1)
        parts.append(torch.bincount(y * AUC_BINS + b, minlength=2 * AUC_BINS).double())
    return torch.cat(parts)


def _auc(neg: list[float], pos: list[float]) -> float:
    """P(score of a positive > score of a negative), ties (same bin) counting one half."""
    n_neg, n_pos = sum(neg), sum(pos)
    if n_neg == 0 or n_pos == 0:
        return math.nan
    below, total = 0.0, 0.0
    for b in range(len(neg)):
        total += pos[b] * (below + 0.5 * neg[b])
        below += neg[b]
    return total / (n_neg * n_pos)


def finish(task: str, sums: torch.Tensor, classes: int, confusion: bool = False) -> dict:
    s = sums.tolist()
    if task != "classification":
        sse, sae, sy, sy2, n = s
        if n == 0:
            return {"count": 0}
        sst = sy2 - sy * sy / n
        return {
            "loss": sse / n,
            "mse": sse / n,
            "mae": sae / n,
            "r2": 1.0 - sse / sst if sst > 0 else math.nan,
            "count": int(n),
        }
    loss, n = s[0], s[1]
    if n == 0:
        return {"count": 0}
    cm = [[int(v) for v in s[2 + r * classes : 2 + (r + 1) * classes]] for r in range(classes)]
    correct = sum(cm[k][k] for k in range(classes))
    precision, recall, f1 = [], [], []
    for k in range(classes):
        predicted = sum(cm[r][k] for r in range(classes))
        actual = sum(cm[k])
        p = cm[k][k] / predicted if predicted else 0.0
        r = cm[k][k] / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    out = {
        "loss": loss / n,
        "accuracy": correct / n,
        "precision": sum(precision) / classes,
        "recall": sum(recall) / classes,
        "f1": sum(f1) / classes,
        "count": int(n),
    }
    if classes == 2:
        hist = s[2 + classes * classes :]
        out["roc_auc"] = _auc(hist[:AUC_BINS], hist[AUC_BINS:])
    if confusion:
        out["confusion_matrix"] = cm
    return out


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss as a SUM over the batch (invariant 1: divide by B after reduction)."""
    if task == "classification":
        return torch.nn.functional.cross_entropy(out, y, reduction="sum")
    return torch.nn.functional.mse_loss(out.reshape(-1), y, reduction="sum")
