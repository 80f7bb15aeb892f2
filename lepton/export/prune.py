"""Magnitude pruning (torch.nn.utils.prune), an optional fine-tune that keeps the sparsity, then
making it permanent.

Contract of ``prune_model(model, run, amount, scope, finetune_epochs)``:
- the weights of every ``nn.Linear`` and ``nn.ConvNd`` are pruned by L1 magnitude: ``scope="global"``
  removes the ``amount`` fraction of smallest weights over all those layers together (layers that
  matter less lose more), ``scope="layer"`` removes ``amount`` of each layer's weights; biases are kept;
- fine-tuning trains the *masked* model (prune's ``weight = weight_orig * weight_mask``
  re-parametrisation), so a pruned weight gets no value back however the optimizer moves
  ``weight_orig``; then ``prune.remove`` bakes the zeros into plain ``weight`` tensors;
- the model is modified in place and returns a dict for the report (sparsity reached, per-epoch loss).

The fine-tune is a single-process loop (for now): it reuses the run's prepared training cache
(``RUN_DIR/data/train_*.npy``), its job's optimizer and global batch size, and the deterministic
sampler of distributed training with one share, so it sees the batches a one-worker run would.
Fine-tuning through the coordinator and workers (``lepton train``'s distributed trainer) is future work.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from .. import metrics
from ..errors import LeptonError
from ..models import build_optimizer
from ..sampler import GlobalBatchSampler
from ..spec import parse_job
from ..storage.prepared import DataCache
from ..storage.rundir import RunDir

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable weights (the quantity ``amount`` asks for)."""
    params = prunable(model)
    total = sum(getattr(m, name).numel() for m, name in params)
    zeros = sum(int((getattr(m, name) == 0).sum()) for m, name in params)
    return zeros / total if total else 0.0


def apply_pruning(model: nn.Module, amount: float, scope: str) -> None:
    params = prunable(model)
    if not params:
        raise LeptonError("--prune: the model has no Linear or Conv layer to prune")
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m, name in params:
            prune.l1_unstructured(m, name, amount=amount)


def make_permanent(model: nn.Module) -> None:
    for m, name in prunable(model):
        if prune.is_pruned(m) and hasattr(m, f"{name}_mask"):
            prune.remove(m, name)


def finetune(model: nn.Module, run: RunDir, epochs: int, log: Callable[[str], None] | None = None) -> list[float]:
    """``epochs`` passes over the run's training split on the (masked) model; mean loss per epoch."""
    try:
        job = parse_job(run.read_job_dict(), source=str(run.job_yaml))
        x, y = DataCache(run).get("train")
    except (OSError, ValueError) as e:
        raise LeptonError(f"{run.root}: cannot read the training cache for fine-tuning ({e})") from None
    sampler = GlobalBatchSampler(len(y), job.train.batch_size, job.seed)
    # the optimizer sees weight_orig (not the masked weight): a fresh one, with the run's settings
    optimizer = build_optimizer(job, model.parameters())
    torch.manual_seed(job.seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        total, count, t0 = 0.0, 0, time.perf_counter()
        # continue the run's sequence of epoch permutations rather than replaying its first epochs
        first = (job.train.epochs + epoch) * sampler.steps_per_epoch
        for s in range(sampler.steps_per_epoch):
            step = first + s
            idx, batch = sampler.worker_slice(step, [1.0], 0)
            xb = torch.from_numpy(np.take(x, idx, axis=0))
            yb = torch.from_numpy(np.take(y, idx, axis=0))
            optimizer.zero_grad(set_to_none=True)
            loss = metrics.loss_fn(job.task, model(xb), yb)
            (loss / batch).backward()     # the loss is a sum (design invariant 1): mean over B here
            optimizer.step()
            total += float(loss.detach())
            count += len(idx)
        losses.append(total / max(count, 1))
        if log:
            log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
    model.eval()
    return losses


def prune_model(model: nn.Module, run: RunDir, amount: float, scope: str = "global", finetune_epochs: int = 0,
                log: Callable[[str], None] | None = None) -> dict:
    """Prune ``model`` in place (see module doc); returns what the report shows about it."""
    apply_pruning(model, amount, scope)
    reached = sparsity(model)
    if log:
        log(f"pruned {scope} L1 magnitude: {reached:.1%} of the Linear/Conv weights are zero")
    losses = finetune(model, run, finetune_epochs, log) if finetune_epochs else []
    make_permanent(model)
    model.eval()
    return {"amount": amount, "scope": scope, "method": "l1_unstructured", "sparsity": sparsity(model),
            "finetune_epochs": finetune_epochs, "finetune_loss": losses,
            "finetune_mode": "single-process" if finetune_epochs else None}
