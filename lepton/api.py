"""The Python API: the same power as the YAML file.

    import lepton
    result = lepton.train("job.yaml", workers=2)                  # or a dict / JobSpec
    result = lepton.train({..., "model": {"type": "factory", "factory": my_build}}, workers=2)
    predictor = lepton.load(result.run_dir)

A callable ``model.factory`` is cloudpickled into the run directory so that worker processes can call
it (it must be importable or picklable by value, as cloudpickle allows).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .console import console
from .errors import LeptonError
from .export.artifacts import load_artifact
from .export.pipeline import run_export
from .launch import open_local, run_local
from .predict import Predictor, RunPredictor, run_model_dir
from .spec import as_job
from .storage.backend import is_url, open_storage
from .storage.mirror import copy_model, model_version
from .storage.rundir import RunDir

# a resumed run continues with the spec it started with (its job.yaml): a changed field would change
# what the checkpoint is continued with, and the data order; only the worker count may differ
RESUME_KEEPS_THE_SPEC = (
    "--set does not apply to --resume: the run continues with its own job.yaml (only"
    " --workers may change); start a new run to change the spec"
)


@dataclass
class TrainResult:
    status: str
    run_dir: Path | str  # a folder, or a URL (a run on object storage)
    summary: dict | None
    reason: str = ""
    export: dict | None = None  # the export report when the job has an ``export:`` section
    export_error: str = ""  # why that export failed (the training result above still holds)


def train(
    job=None,
    workers: int | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    progress: bool = False,
    threads: int | None = None,
    data_from: str | Path | None = None,
) -> TrainResult:
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
    spec = None if resume else as_job(job, overrides)
    with open_local(spec, run_dir, resume, workers, threads, data_from) as launch:
        outcome = run_local(launch.opened, launch.workers, launch.listener, progress)
        report, export_error = None, ""
        opened = launch.opened
        if outcome.status == "completed" and opened.job.export is not None:  # while the run is held
            try:
                report = run_export(
                    opened.run.location,
                    opened.job.export,
                    progress=progress,
                    log=lambda m: console.print(m, markup=False, highlight=False),
                )
            except LeptonError as e:  # raising would lose the result of the training that did complete
                export_error = str(e)
            except KeyboardInterrupt:  # Ctrl-C while exporting: the training result still stands
                export_error = (
                    f"interrupted; export the trained model with: lepton export {opened.run.where()}"
                )
    return TrainResult(outcome.status, outcome.run_dir, outcome.summary, outcome.reason, report, export_error)


def load(path: str | Path) -> Predictor:
    """A predictor from a run directory (its ``model/``), a model directory (``RunPredictor``), or an
    exported artifact file (``ArtifactPredictor``: ONNX through onnxruntime, TorchScript, safetensors)
    with the same interface. The one entry point of ``lepton.load``, ``lepton predict`` and
    ``lepton serve``. A URL (``s3://bucket/run``) names a run, or an artifact, on object storage: the
    files are fetched into a download cache and a copy of this machine's (storage/mirror.py)."""
    if is_url(path):
        return _load_remote(str(path))
    p = Path(path)
    if not p.exists():
        raise LeptonError(f"{p}: no such run or model directory")
    if p.is_file():  # an exported artifact (lepton export)
        return load_artifact(p)
    return RunPredictor(run_model_dir(p))


def _load_remote(url: str) -> Predictor:
    run = RunDir(url)
    if model_version(run) is None and not run.holds_run():  # not a run: an artifact file, or nothing
        parent, _, name = url.rstrip("/").rpartition("/")
        try:
            return load_artifact(open_storage(parent).local_path(name))
        except FileNotFoundError:
            raise LeptonError(f"{url}: no such run, model or artifact") from None
    folder = Path(tempfile.mkdtemp(prefix="lepton-model-"))
    atexit.register(shutil.rmtree, folder, True)  # links into the download cache: nothing is lost
    return RunPredictor(copy_model(run, folder))
