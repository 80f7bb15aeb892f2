"""``lepton runs [DIR]``: the run directories under DIR with their status, progress and best metric.

Everything is read from the files a run directory keeps: ``state.json`` (status, step),
``job.yaml`` (name, task), ``metrics.jsonl`` (validation records: the best one is the highest accuracy
for classification, the lowest MSE, else loss, for regression) and ``summary.json`` (the test metric).
Nothing is written; a half-written or foreign folder is shown with what can be read, never an error.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.table import Table

from .console import out
from .errors import LeptonError, first_line
from .storage.backend import is_url
from .storage.rundir import EVENTS_JSONL, JOB_YAML, METRICS_JSONL, STATE_JSON, SUMMARY_JSON, RunDir

# (metric, mode) tried in order: the first one the validation records carry is the one reported
BEST = {
    "classification": [("accuracy", "max"), ("loss", "min")],
    "regression": [("mse", "min"), ("loss", "min")],
}
TEST = {"classification": ["accuracy", "loss"], "regression": ["mse", "loss"]}


def _json(run: RunDir, rel: str) -> dict:
    try:
        obj = json.loads(run.storage.read(rel).decode())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _yaml(run: RunDir, rel: str) -> dict:
    try:
        obj = yaml.safe_load(run.storage.read(rel).decode())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _val_records(run: RunDir) -> list[dict]:
    """The validation records of ``metrics.jsonl`` (torn or foreign lines are skipped)."""
    out: list[dict] = []
    try:
        f = run.storage.open_read(METRICS_JSONL)
    except OSError:
        return out
    with f:
        for line in f:
            if b'"eval"' not in line:  # cheap filter: most lines are training records
                continue
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and rec.get("kind") == "eval" and rec.get("split", "val") == "val":
                out.append(rec)
    return out


def best_metric(records: list[dict], task: str) -> Optional[dict]:
    """``{"metric", "value", "step"}`` of the best validation record, or None without one."""
    for metric, mode in BEST.get(task, BEST["classification"]):
        scored = [r for r in records if _finite(r.get(metric))]
        if scored:
            pick = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
            return {"metric": metric, "mode": mode, "value": float(pick[metric]), "step": pick.get("step")}
    return None


def _task(job: dict, records: list[dict], summary: dict) -> str:
    task = job.get("task")
    if task in BEST:
        return task
    seen = set().union(
        *(r.keys() for r in records), *(v.keys() for v in summary.values() if isinstance(v, dict))
    )
    return "regression" if "mse" in seen and "accuracy" not in seen else "classification"


def run_info(path: str | Path) -> dict:
    """What ``lepton runs`` shows about one run directory."""
    run = RunDir(path)
    state, summary, job = _json(run, STATE_JSON), _json(run, SUMMARY_JSON), _yaml(run, JOB_YAML)
    records = _val_records(run)
    task = _task(job, records, summary)
    status = state.get("status") or summary.get("status") or "unknown"
    test = None
    split = summary.get("test")
    if not isinstance(split, dict):
        split = {}
    if split.get("count"):
        for metric in TEST[task]:
            if _finite(split.get(metric)):
                test = {"metric": metric, "value": float(split[metric])}
                break
    mtimes = []
    for rel in ("", STATE_JSON, METRICS_JSONL, EVENTS_JSONL, SUMMARY_JSON, JOB_YAML):
        try:
            mtimes.append(run.storage.modified(rel))
        except OSError:
            pass
    return {
        "name": run.where().rstrip("/").rpartition("/")[2],
        "path": run.where(),
        "job": state.get("name") or job.get("name"),
        "task": task,
        "status": status,
        "reason": state.get("reason", ""),
        "step": state.get("step", summary.get("steps")),
        "total_steps": state.get("total_steps"),
        "epoch": state.get("epoch"),
        "best": best_metric(records, task),
        "test": test,
        "modified": max(mtimes) if mtimes else None,
    }


def _is_run(d: str | Path) -> bool:
    try:
        return (is_url(d) or Path(d).is_dir()) and RunDir(d).holds_run()
    except OSError:  # e.g. another user's folder we may not look into: not ours to list
        return False


def list_runs(root: str | Path = "runs") -> list[dict]:
    """The runs under ``root`` (or ``root`` itself when it is one), most recently modified first.
    ``root`` may be a URL (``s3://bucket/runs``): the runs on object storage."""
    if is_url(root):
        url = str(root).rstrip("/")
        try:
            top = RunDir(url)
            dirs: list[str | Path] = (
                [url]
                if top.holds_run()
                else [f"{url}/{n.rstrip('/')}" for n in top.storage.list("") if n.endswith("/")]
            )
        except OSError as e:
            raise LeptonError(f"{url}: cannot list the runs there: {first_line(e)}") from None
        dirs = [d for d in dirs if _is_run(d)]
    else:
        root = Path(root)
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "no such folder"
            raise LeptonError(
                f"{root}: {what} (give the folder that holds the run directories, or a run directory)"
            )
        dirs = [root] if RunDir(root).holds_run() else [d for d in root.iterdir() if _is_run(d)]
    rows = [run_info(d) for d in dirs]
    rows.sort(key=lambda r: (r["modified"] or 0, r["name"]), reverse=True)
    return rows


_STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "waiting": "yellow",
    "regrouping": "yellow",
    "failed": "red",
    "stopped": "magenta",
}


_SHORT = {"accuracy": "acc"}


def _fmt_metric(m: Optional[dict]) -> str:
    if not m:
        return "-"
    v = m["value"]
    return f"{v:.4f} {_SHORT.get(m['metric'], m['metric'])}" if abs(v) < 1e4 else f"{v:,.0f} {m['metric']}"


def _table(rows: list[dict], root: str):
    t = Table(title=f"runs in {root}")
    t.add_column("run", overflow="fold", min_width=10)
    t.add_column("status", no_wrap=True)
    t.add_column("step", justify="right", no_wrap=True)
    t.add_column("best val", justify="right", no_wrap=True)
    t.add_column("test", justify="right", no_wrap=True)
    t.add_column("modified")
    for r in rows:
        style = _STATUS_STYLE.get(r["status"], "")
        status = f"[{style}]{r['status']}[/{style}]" if style else r["status"]
        step = "-" if r["step"] is None else str(r["step"])
        if r["total_steps"]:
            step += f"/{r['total_steps']}"
        b = r["best"]
        best = _fmt_metric(b) + (f" @{b['step']}" if b and b["step"] is not None else "")
        modified = time.strftime("%m-%d %H:%M", time.localtime(r["modified"])) if r["modified"] else "-"
        t.add_row(r["name"], status, step, best, _fmt_metric(r["test"]), modified)
    return t


def cmd_runs(args) -> int:
    rows = list_runs(args.dir)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        out.print(f"no runs in {args.dir}", highlight=False)
        return 0
    out.print(_table(rows, args.dir))
    return 0


def add_runs_command(sub) -> None:
    """Register ``lepton runs`` on the CLI's subparsers (dispatched through ``handler``)."""
    p = sub.add_parser("runs", help="list run directories with their status and best validation metric")
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run directories (default: runs)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=cmd_runs)
