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
from .coordinator.server import Listener
from .launcher import InterruptCounter, LocalSupervisor, LocalWorkers, open_run, start_coordinator
from .storage.rundir import new_token
from .spec import as_job


# a resumed run continues with the spec it started with (its job.yaml): a changed field would change
# what the checkpoint is continued with, and the data order; only the worker count may differ
RESUME_KEEPS_THE_SPEC = ("--set does not apply to --resume: the run continues with its own job.yaml (only"
                         " --workers may change); start a new run to change the spec")


@dataclass
class TrainResult:
    status: str
    run_dir: Path
    summary: dict | None
    reason: str = ""
    export: dict | None = None          # the export report when the job has an ``export:`` section
    export_error: str = ""              # why that export failed (the training result above still holds)


def train(job=None, workers: int | None = None, run_dir: str | Path | None = None, resume: bool = False,
          overrides: list[str] | None = None, progress: bool = False, threads: int | None = None,
          data_from: str | Path | None = None) -> TrainResult:
    """Train with a local coordinator and ``workers`` local worker processes; blocks until the end.

    ``data_from``: train on that run directory's prepared data (its split, preprocessing and rows, e.g.
    to compare models on the same split) instead of reading ``data.path`` again.

    Raises ``LeptonError`` for bad input; a run that fails or is interrupted returns its status and
    reason (the run directory stays resumable). When the job's ``export:`` phase fails after training
    completed, the result says why in ``export_error`` (the trained model is kept)."""
    overrides = list(overrides or [])
    if resume and overrides:
        raise LeptonError(RESUME_KEEPS_THE_SPEC)
    if resume and data_from is not None:
        raise LeptonError("data_from applies to a new run; a resumed run keeps its own prepared data")
    if workers is not None and not resume:
        overrides.append(f"cluster.workers={workers}")
    if resume:
        opened = open_run(None, run_dir, True, workers)
        try:
            listener = Listener()
            local = LocalWorkers(listener.url, opened.token, opened.job.cluster.workers, threads)
        except BaseException:
            opened.release()
            raise
    else:
        spec = as_job(job, overrides)
        if spec.cluster.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise LeptonError("cluster.device is 'cuda' but torch sees no GPU on this machine"
                                  " (use auto or cpu)")
        token = new_token()
        # workers start now and import torch while the data is prepared; they wait in the backlog
        listener = Listener()
        local = LocalWorkers(listener.url, token, spec.cluster.workers, threads)
        try:
            opened = open_run(spec, run_dir, False, token=token, data_from=data_from)
        except BaseException:
            local.wait(timeout_s=0)
            listener.close()
            raise
    try:
        return _run(opened, local, listener, progress)
    finally:
        opened.release()        # the run directory is free for a resume or an export


def _run(opened, local, listener, progress: bool) -> TrainResult:
    """The opened run to its end: coordinator, local workers, progress, then the export phase."""
    local.attach_logs(opened.run.logs_dir)
    server = start_coordinator(opened, listener)
    coord = server.coord
    if progress:
        from .coordinator.dashboard import dashboard_url
        console.print(f"dashboard: {dashboard_url(server.url, opened.token)}", markup=False, highlight=False,
                      soft_wrap=True)
    supervisor = LocalSupervisor(server, local, opened.job)
    try:
        with TrainingProgress(enabled=progress) as bar, InterruptCounter() as interrupts:
            def poll(status: dict) -> None:
                bar.update(status)
                supervisor.check(interrupts.count)
            server.wait(on_poll=poll)
    finally:
        if supervisor.forced:
            local.kill()
        else:
            local.wait()         # they hear 'exit' on their next poll and leave on their own
        server.stop()
    reason = coord.reason
    if coord.phase.value == "failed" and local.failure_output():
        console.print(local.failure_output(), markup=False, highlight=False)
    report, export_error = None, ""
    if coord.phase.value == "completed" and opened.job.export is not None:
        from .export.pipeline import run_export
        try:
            report = run_export(opened.run.root, opened.job.export, progress=progress,
                                log=lambda m: console.print(m, markup=False, highlight=False))
        except LeptonError as e:     # raising would lose the result of the training that did complete
            export_error = str(e)
        except KeyboardInterrupt:    # Ctrl-C while exporting: the training result still stands
            export_error = f"interrupted; export the trained model with: lepton export {opened.run.root}"
    return TrainResult(coord.phase.value, opened.run.root, coord.summary, reason, report, export_error)
