"""The export report: quality and CPU speed of each artifact next to the fp32 model it came from.

For every candidate (the run's fp32 torch model first, then each artifact) on the run's test split
(``RUN_DIR/data/test_{x,y}.npy``, already preprocessed):
- ``metrics``: the test metrics computed by ``lepton.metrics`` exactly as training reports them;
- ``max_abs_diff``: the largest absolute difference of any output (logit / regression value) from the
  fp32 torch model's output; ``agreement``: the fraction of rows whose predicted class is the same;
- ``latency_ms``: p50 / p95 / mean of one forward call at batch 1 and at batch 64, after a warm-up,
  on the CPU, every candidate with the same thread count (``threads``);
- ``throughput_rows_s``: 64 / the batch-64 p50 (rows per second of back-to-back batch-64 calls);
- ``size_bytes`` and ``compression``: the file size and how many times smaller than the fp32 model's
  weights file (``model/weights.safetensors``; artifacts also carry their metadata, so this errs
  against them).
Timings are measured, never assumed; they depend on the machine and its load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch
from rich.console import Console, JustifyMethod
from rich.table import Table

from .. import metrics

BATCHES = (1, 64)
EVAL_CHUNK = 4096

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Candidate:
    name: str  # the table's label, e.g. "model.int8.onnx"
    runner: Runner
    format: str  # "torch" (eager), "onnx", "torchscript", "safetensors"
    precision: str  # "fp32", "int8", "fp16", "bf16"
    path: Path | None = None  # the file, when there is one
    pruned: bool = False


def outputs(runner: Runner, x: np.ndarray) -> np.ndarray:
    parts = [
        runner(np.ascontiguousarray(x[s : s + EVAL_CHUNK], dtype=np.float32))
        for s in range(0, len(x), EVAL_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)


def split_metrics(task: str, out: np.ndarray, y: np.ndarray) -> dict:
    classes = out.shape[1] if task == "classification" else 0
    sums = metrics.batch_sums(
        task,
        torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y)),
        classes,
    )
    return metrics.finish(task, sums, classes)


def latency_ms(runner: Runner, x: np.ndarray, runs: int) -> dict:
    """p50/p95/mean milliseconds of ``runner(x)`` over ``runs`` calls after a warm-up."""
    for _ in range(max(5, runs // 10)):
        runner(x)
    t = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        runner(x)
        t[i] = time.perf_counter_ns() - t0
    t /= 1e6
    return {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "mean": float(t.mean())}


def measure(
    c: Candidate,
    task: str,
    x: np.ndarray,
    y: np.ndarray,
    ref_out: np.ndarray | None,
    baseline_size: int | None,
    runs: int,
) -> tuple[dict, np.ndarray]:
    """The report row of one candidate (see module doc) and its outputs on the test split."""
    out = outputs(c.runner, x)
    row: dict = {
        "name": c.name,
        "format": c.format,
        "precision": c.precision,
        "pruned": c.pruned,
        "path": str(c.path) if c.path else None,
    }
    size = c.path.stat().st_size if c.path else None
    row["size_bytes"] = size
    row["compression"] = round(baseline_size / size, 3) if size and baseline_size else None
    row["metrics"] = split_metrics(task, out, y)
    if ref_out is not None and len(out):
        row["max_abs_diff"] = float(np.abs(out.astype(np.float64) - ref_out.astype(np.float64)).max())
        row["agreement"] = (
            float((out.argmax(1) == ref_out.argmax(1)).mean()) if task == "classification" else None
        )
    else:
        row["max_abs_diff"], row["agreement"] = None, None
    row["latency_ms"] = {}
    if len(x) and runs > 0:
        for b in BATCHES:
            xb = np.ascontiguousarray(np.take(x, np.arange(b) % len(x), axis=0), dtype=np.float32)
            row["latency_ms"][f"batch_{b}"] = latency_ms(c.runner, xb, runs)
        p50 = row["latency_ms"][f"batch_{BATCHES[-1]}"]["p50"]
        row["throughput_rows_s"] = round(BATCHES[-1] / (p50 / 1e3), 1) if p50 > 0 else None
    else:
        row["throughput_rows_s"] = None
    return row, out


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _lat(row: dict, b: int) -> str:
    lat = row.get("latency_ms", {}).get(f"batch_{b}")
    return f"{lat['p50']:.3f} / {lat['p95']:.3f}" if lat else "-"


def report_table(report: dict) -> Table:
    """The printed form of a report (``lepton export`` and benchmarks/export.py)."""
    task = report["task"]
    key = "accuracy" if task == "classification" else "mse"
    base = report["rows"][0]["metrics"].get(key) if report["rows"] else None
    t = Table(
        title=f"lepton export: {report['name']}  (test split: {report['test_rows']} rows,"
        f" {report['threads']} CPU threads)"
    )
    for col, just in (
        ("artifact", "left"),
        ("size", "right"),
        ("x smaller", "right"),
        (key, "right"),
        ("delta", "right"),
        ("agree", "right"),
        ("max |diff|", "right"),
        ("b1 p50/p95 ms", "right"),
        ("b64 p50/p95 ms", "right"),
        ("rows/s", "right"),
    ):
        t.add_column(col, justify=cast(JustifyMethod, just))
    for row in report["rows"]:
        v = row["metrics"].get(key)
        if v is None or base is None:
            delta = "-"
        elif task == "classification":
            delta = f"{(v - base) * 100:+.2f} pt"
        else:
            delta = f"{v - base:+.4g}"
        t.add_row(
            row["name"],
            _size(row["size_bytes"]),
            f"{row['compression']:.2f}" if row.get("compression") else "-",
            f"{v:.4f}" if v is not None else "-",
            delta,
            f"{row['agreement']:.3f}" if row.get("agreement") is not None else "-",
            f"{row['max_abs_diff']:.2e}" if row.get("max_abs_diff") is not None else "-",
            _lat(row, 1),
            _lat(row, 64),
            f"{row['throughput_rows_s']:,.0f}" if row.get("throughput_rows_s") else "-",
        )
    return t


def print_report(report: dict, console=None) -> None:
    """The table, the notes and where the JSON is, on ``console`` (default: stdout). Piped output gets
    a wide console: rich would squeeze the ten columns into 80 and truncate every cell."""
    con = console or Console()
    if not con.is_terminal:
        con = Console(width=max(con.width, 170), file=con.file)
    con.print(report_table(report))
    pruning = report.get("pruning")
    if pruning:
        line = (
            f"pruned: {pruning['sparsity']:.1%} of the Linear/Conv weights are zero ({pruning['scope']} L1)"
        )
        tuned = pruning.get("finetune")
        if tuned:
            vals = tuned.get("val_loss") or []
            line += (
                f"; fine-tuned {tuned['epochs']} epoch(s) on {tuned['workers']} worker(s)"
                + (
                    f", val loss after the first validation {vals[0]:.4g}, at the end {vals[-1]:.4g}"
                    if vals
                    else ""
                )
                + f" (run: {tuned['run_dir']})"
            )
        con.print(line, markup=False, highlight=False)
    for note in report.get("notes", []):
        con.print(f"note: {note}", markup=False, highlight=False)
    where = f"{str(report['run_dir']).rstrip('/')}/exports/report.json"  # a folder or a URL
    con.print(f"report: {where}", markup=False, highlight=False)
