"""What a person sees: the live progress bar and the final tables (rich)."""

from __future__ import annotations

from typing import Any, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)
out = Console()


class TrainingProgress:
    """A progress bar fed with the coordinator's status snapshots."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TextColumn("workers {task.fields[workers]}"),
            TextColumn("{task.fields[shares]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task: Optional[TaskID] = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, st: dict) -> None:
        live = sum(1 for w in st["workers"] if w["state"] in ("training", "finished"))
        training = sorted(
            (w for w in st["workers"] if w["state"] == "training" and w["share_fraction"]),
            key=lambda w: w["rank"],
        )
        # each worker's share of the global batch and its compute speed, in rank order
        each = " ".join(f"{w['share_fraction']:.0%}@{_rate(w['samples_per_s'])}" for w in training)
        fields: dict[str, Any] = {
            "shares": f"share@samples/s {each}" if training else "",
            "loss": f"{st['loss']:.4f}" if st.get("loss") is not None else "-",
            "speed": f"{st['samples_per_s']:,.0f}" if st.get("samples_per_s") else "-",
            "workers": f"{live}/{st['target_workers']}",
        }
        desc = (
            f"epoch {min(st['epoch'] + 1, st['epochs'])}/{st['epochs']}"
            if st["status"] == "running"
            else st["status"]
        )
        if self.task is None:
            self.task = self.progress.add_task(desc, total=st.get("total_steps") or None, **fields)
        self.progress.update(
            self.task, description=desc, completed=st["step"], total=st.get("total_steps") or None, **fields
        )


def _rate(v: Optional[float]) -> str:
    """A speed in few characters: 180, 4.2k, 35k."""
    if v is None:
        return "-"
    if v < 1000:
        return f"{v:.0f}"
    return f"{v / 1000:.1f}k" if v < 10_000 else f"{v / 1000:.0f}k"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def summary_table(summary: dict, run_dir: str) -> Table:
    splits = [s for s in ("train", "val", "test") if summary.get(s, {}).get("count")]
    names = [
        k
        for k in ("loss", "accuracy", "precision", "recall", "f1", "roc_auc", "mse", "mae", "r2")
        if any(k in summary[s] for s in splits)
    ]
    t = Table(
        title=f"Lepton run {summary.get('status', '')}",
        show_header=True,
        caption=f"run directory: {run_dir}",
        caption_justify="left",
    )
    t.add_column("metric")
    for s in splits:
        t.add_column(s, justify="right")
    for n in names:
        t.add_row(n, *[_fmt(summary[s].get(n)) for s in splits])
    t.add_row("rows", *[str(summary[s]["count"]) for s in splits])
    t.add_section()
    t.add_row("steps", str(summary.get("steps")))
    epochs, planned = summary.get("epochs"), summary.get("epochs_planned")
    t.add_row("epochs", f"{epochs} of {planned}" if planned not in (None, epochs) else str(epochs))
    t.add_row("workers", str(summary.get("workers")))
    sps = summary.get("samples_per_s")
    t.add_row("samples/s", f"{sps:,.0f}" if sps else "-")
    t.add_row("wall time", f"{summary.get('wall_s', 0):.1f} s")
    if summary.get("stopped_early"):
        t.add_row("stopped early", f"best at step {summary.get('best_step')}")
    return t


def status_table(st: dict) -> Table:
    t = Table(
        title=f"{st['name']}: {st['status']}  step {st['step']}/{st.get('total_steps') or '?'}"
        f"  epoch {st['epoch']}  generation {st['generation']}"
    )
    for col in ("worker", "host", "pid", "state", "rank", "step", "samples/s", "share", "last seen"):
        t.add_column(col)
    for w in st["workers"]:
        share = f"{w['share_fraction']:.0%}" if w["share_fraction"] is not None else "-"
        speed = f"{w['samples_per_s']:,.0f}" if w["samples_per_s"] is not None else "-"
        t.add_row(
            w["worker_id"],
            w["host"],
            str(w["pid"]),
            w["state"],
            _fmt(w["rank"]),
            str(w["step"]),
            speed,
            share,
            f"{w['last_seen_s']:.1f} s ago",
        )
    return t
