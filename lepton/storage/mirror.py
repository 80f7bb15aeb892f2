"""Local copies of a run that lives elsewhere (an object store), for the readers that need files.

The predictor memory-maps its safetensors and reads its ``lepton.json``; the export pipeline traces,
quantizes and measures on the prepared splits with NumPy and ONNX Runtime; all of them take a folder
of this machine. For a run on object storage they work on a copy made here: the final model's
committed version (the newest valid manifest, manifest.py) and, for an export, the job, the model
factory and the prepared data. Each file is fetched through ``RunStorage.local_path`` (a download
cached by the file's URL and ETag, so a second ``lepton predict`` fetches nothing) and linked into
the copy. The copy is only read; what an export writes goes back into the run (export/pipeline.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import LeptonError
from . import manifest
from .checkpoint import MODEL_META
from .rundir import DATA_DIR, FACTORY_PICKLE, JOB_YAML, MODEL_DIR, RunDir


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # the cache on another file system
        shutil.copyfile(src, dst)


def _files(run: RunDir, rel: str) -> list[str]:
    return [n for n in run.storage.list(rel) if not n.endswith("/")]


def model_version(run: RunDir) -> str | None:
    """The name, relative to the run's root, of the folder that holds its final model; None if none."""
    rel: str | None = MODEL_DIR
    if manifest.is_object_store(run.storage):
        rel = manifest.resolve(run.storage, MODEL_DIR)
    if rel is None or not run.storage.exists(f"{rel}/{MODEL_META}"):
        return None
    return rel


def copy_model(run: RunDir, dest: Path) -> Path:
    """The run's final model as the folder ``dest`` (created): its committed files, linked from the
    download cache. LeptonError when the run has none."""
    rel = model_version(run)
    if rel is None:
        raise LeptonError(
            f"{run.where(MODEL_DIR)}: no trained model in this run yet (it is written when training"
            " completes; see `lepton runs` for the run's status)"
        )
    for name in _files(run, rel):
        _link(run.storage.local_path(f"{rel}/{name}"), dest / name)
    return dest


def copy_run(run: RunDir, dest: Path) -> RunDir:
    """What ``lepton export`` reads of ``run`` (its job, factory, prepared data and final model) as the
    local run folder ``dest``."""
    for rel in (JOB_YAML, FACTORY_PICKLE):
        if run.storage.exists(rel):
            _link(run.storage.local_path(rel), dest / rel)
    for name in _files(run, DATA_DIR):
        _link(run.storage.local_path(f"{DATA_DIR}/{name}"), dest / DATA_DIR / name)
    copy_model(run, dest / MODEL_DIR)
    return RunDir(dest)
