"""The Python API: the same power as the YAML file.

    import lepton
    result = lepton.train("job.yaml", workers=2)                  # or a dict / JobSpec
    result = lepton.train({..., "model": {"type": "factory", "factory": my_build}}, workers=2)
    predictor = lepton.load(result.run_dir)

A callable ``model.factory`` is cloudpickled into the run directory so that worker processes can call
it (it must be importable or picklable by value, as cloudpickle allows).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .console import TrainingProgress, console
from .errors import LeptonError
from .launcher import LocalWorkers, open_run, start_coordinator
from .spec import JobSpec, load_job, parse_job


@dataclass
class TrainResult:
    status: str
    run_dir: Path
    summary: dict | None
    reason: str = ""


def _as_job(job, overrides: list[str] | None) -> JobSpec:
    if isinstance(job, (str, Path)):
        return load_job(job, overrides)
    if isinstance(job, JobSpec):
        job = job.model_dump(mode="python")
    if isinstance(job, dict):
        return parse_job(job, source="job", overrides=overrides, base_dir=Path.cwd())
    raise LeptonError(f"lepton.train: expected a path, dict or JobSpec, got {type(job).__name__}")


def train(job=None, workers: int | None = None, run_dir: str | Path | None = None, resume: bool = False,
          overrides: list[str] | None = None, progress: bool = False, threads: int | None = None) -> TrainResult:
    """Train with a local coordinator and ``workers`` local worker processes; blocks until the end.

    Raises ``LeptonError`` for bad input; a run that fails or is interrupted returns its status and
    reason (the run directory stays resumable)."""
    overrides = list(overrides or [])
    if workers is not None and not resume:
        overrides.append(f"cluster.workers={workers}")
    spec = None if resume else _as_job(job, overrides)
    opened = open_run(spec, run_dir, resume, workers)
    count = opened.job.cluster.workers
    server = start_coordinator(opened, workers=count)
    local = LocalWorkers(server.url, opened.run, count, threads)
    coord = server.coord
    try:
        with TrainingProgress(enabled=progress) as bar:
            def poll(status: dict) -> None:
                bar.update(status)
                for pid, code in local.newly_exited():
                    with server.lock:
                        coord.process_exited(pid, code)
            server.wait(on_poll=poll)
    except KeyboardInterrupt:
        with server.lock:
            coord.stop("interrupted (Ctrl-C)")
    finally:
        server.stop(linger_s=0.5)
        local.wait()
    reason = coord.reason
    if coord.phase.value == "failed" and local.log_tail():
        console.print(local.log_tail(), markup=False, highlight=False)
    return TrainResult(coord.phase.value, opened.run.root, coord.summary, reason)
