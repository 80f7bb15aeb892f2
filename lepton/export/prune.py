"""Magnitude pruning (torch.nn.utils.prune), an optional fine-tune that keeps the sparsity.

Contract of ``prune_model(model, run, amount, scope, finetune_epochs, finetune_workers)``:
- the weights of every ``nn.Linear`` and ``nn.ConvNd`` are pruned by L1 magnitude: ``scope="global"``
  removes the ``amount`` fraction of smallest weights over all those layers together (layers that
  matter less lose more), ``scope="layer"`` removes ``amount`` of each layer's weights; biases are kept;
  the pruning is made permanent at once (``prune.remove``: the zeros are plain entries of ``weight``);
- fine-tuning is a distributed Lepton run of its own, ``RUN_DIR/exports/finetune/`` (coordinator and
  ``finetune_workers`` local worker processes, the run's worker count by default, on this machine's
  device): the run's job for ``finetune_epochs`` epochs, starting from the pruned weights
  (``model.init_weights``, which the run copies in) with ``model.keep_zeros`` (a pruned weight gets no
  gradient and stays exactly zero, as prune's ``weight_orig × mask`` would), on the run's own prepared
  data (the same split; ``launch.open_local(data_from=…)``), with a fresh optimizer and schedule and the job's
  evaluation and policies (keep-best picks among the fine-tune's validations); its epochs visit the
  training split in the orders of the run's first epochs (the same seed). Its final model replaces the
  pruned weights; a later export with a fine-tune replaces that run;
- the model is modified in place; returns a dict for the report (sparsity reached, the fine-tune's run).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, cast

import cloudpickle
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune

from ..errors import LeptonError
from ..launch import open_local, run_local
from ..records import EvalRecord, parse_record
from ..spec import parse_job
from ..storage.checkpoint import MODEL_WEIGHTS
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


def finetune(
    model: nn.Module,
    run: RunDir,
    epochs: int,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune the pruned ``model`` in place as a distributed run (module doc); what the report shows."""
    job = run.read_job_dict()
    workers = workers or int(job.get("cluster", {}).get("workers", 1))
    child = run.finetune_dir
    with tempfile.TemporaryDirectory(prefix="lepton-finetune-") as tmp:
        init = Path(tmp) / "pruned.safetensors"  # the run copies it in (model.init_weights)
        save_file(
            {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, str(init)
        )
        job["name"] = f"{job.get('name', 'job')}-finetune"
        job["model"].update(init_weights=str(init), keep_zeros=True)
        if run.factory_pickle.exists():  # a callable from the Python API: job.yaml holds only its name
            job["model"]["factory"] = cloudpickle.loads(run.factory_pickle.read_bytes())
        job["train"]["epochs"] = epochs
        job["export"] = None
        cluster = job.setdefault("cluster", {})
        # the run's placement options were for its own worker count and machines; the fine-tune runs
        # here, on a GPU if this machine has one
        cluster.update(
            workers=workers,
            shares=None,
            max_workers=None,
            device="auto",
            min_workers=min(int(cluster.get("min_workers", 1)), workers),
        )
        # validated before anything is deleted; relative paths as lepton.train would read them
        spec = parse_job(job, source=f"{run.job_yaml} (as the fine-tune's job)", base_dir=Path.cwd())
        shutil.rmtree(child, ignore_errors=True)  # an earlier export's fine-tune: derived, replaced
        if log:
            log(f"fine-tuning the pruned model: {epochs} epoch(s), {workers} worker(s), run {child}")
        with open_local(spec, child, data_from=run.root) as launch:  # the launcher, not lepton.train
            res = run_local(launch.opened, launch.workers, launch.listener, progress)
    if res.status != "completed":
        raise LeptonError(
            f"the fine-tune of the pruned model {res.status}: {res.reason} (its run: {res.run_dir})"
        )
    model.load_state_dict(load_file(str(Path(res.run_dir) / "model" / MODEL_WEIGHTS)))  # a local run
    model.eval()
    s = res.summary or {}
    evals = [parse_record(line) for line in RunDir(res.run_dir).metrics() if line.get("kind") == "eval"]
    vals = [
        r.metrics["loss"]
        for r in evals
        if isinstance(r, EvalRecord) and r.split == "val" and "loss" in r.metrics
    ]
    return {
        "run_dir": str(res.run_dir),
        "workers": workers,
        "epochs": epochs,
        "steps": s.get("steps"),
        "train_loss": (s.get("train") or {}).get("loss"),
        "val_loss": vals,
    }


def prune_model(
    model: nn.Module,
    run: RunDir,
    amount: float,
    scope: str = "global",
    finetune_epochs: int = 0,
    finetune_workers: int | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict:
    """Prune ``model`` in place (see module doc); returns what the report shows about it."""
    apply_pruning(model, amount, scope)
    make_permanent(model)
    reached = sparsity(model)
    if log:
        log(f"pruned {scope} L1 magnitude: {reached:.1%} of the Linear/Conv weights are zero")
    tuned = (
        finetune(model, run, finetune_epochs, finetune_workers, log, progress) if finetune_epochs else None
    )
    model.eval()
    after = sparsity(model)
    if after < reached:  # keep_zeros failed: never ship that as "pruned"
        tuned = cast(dict, tuned)  # only a fine-tune changes the weights
        raise LeptonError(
            f"the fine-tune lost sparsity ({reached:.1%} → {after:.1%} zeros); its run: {tuned['run_dir']}"
        )
    return {
        "amount": amount,
        "scope": scope,
        "method": "l1_unstructured",
        "sparsity": after,
        "finetune_epochs": finetune_epochs,
        "finetune": tuned,
    }
