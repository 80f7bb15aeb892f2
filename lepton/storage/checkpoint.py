"""Checkpoints and the final model, written so that a crash at any instant leaves a usable run.

A checkpoint is written into a hidden temporary folder, fsynced, and renamed to
``checkpoints/step-N`` once complete (the folder it is in synced after the rename); older ones are
deleted only after the new one exists (the last good checkpoint is never overwritten in place,
invariant 4). Saving runs on a background thread after the state has been copied to host memory, so
training stalls only for that copy.

All of it goes through the run's ``RunStorage`` (backend.py). The functions that take a ``Path``
(``write_state_dir``, ``read_checkpoint``, ``write_model`` ...) work on that folder of this machine
unless a ``storage`` is given, in which case the path is a name relative to that storage's root.
On an object store (a storage with ``object_store`` set) a folder rename is a copy: there a checkpoint,
the keep-best model and the final model are committed by a create-only manifest written after their
objects (manifest.py), and readers resolve the newest valid manifest.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from . import manifest
from .backend import LocalStorage, RunStorage
from .rundir import CHECKPOINTS_DIR, RunDir, _json_bytes

STATE_FILE = "state.pt"
MODEL_WEIGHTS = "weights.safetensors"
MODEL_META = "lepton.json"


def _at(path: str | Path, storage: RunStorage | None) -> tuple[RunStorage, str]:
    """(storage, name) of a folder: a local ``path`` as (its parent, its name), or ``path`` in ``storage``."""
    if storage is not None:
        return storage, Path(path).as_posix() if isinstance(path, Path) else path
    p = Path(path)
    return LocalStorage(p.parent), p.name


def _sibling(rel: str, name: str) -> str:
    folder, _, _ = rel.rpartition("/")
    return f"{folder}/{name}" if folder else name


def _aside_rel(rel: str) -> str:
    return _sibling(rel, f".{rel.rpartition('/')[2]}.old")


def _quiet_delete(storage: RunStorage, rel: str) -> None:
    try:
        storage.delete(rel)
    except OSError:
        pass  # as rmtree(ignore_errors=True): a leftover is removed by the next save


def _replace_dir(storage: RunStorage, tmp: str, final: str) -> None:
    """The complete folder ``tmp`` renamed to ``final``; a folder already there is moved aside first, not
    deleted, until the new one is in place (a crash in between leaves it readable as ``.NAME.old``)."""
    old = _aside_rel(final)
    if storage.exists(final):  # the same step saved again (e.g. the final save)
        _quiet_delete(storage, old)
        storage.move(final, old)
    storage.move(tmp, final)  # the folder it is in synced
    _quiet_delete(storage, old)


def write_state_dir(
    final: str | Path, step: int, state: dict, storage: RunStorage | None = None
) -> Path | str:
    """``state`` into the folder ``final``, written beside it and renamed, replacing it whole. Its
    data reaches the disk before the rename does (a crash must not leave a complete-looking folder
    with an empty state file), and a folder of the same step is moved aside, not deleted, until the
    new one is in place (``readable_state_dir`` finds it if a crash came in between)."""
    storage, rel = _at(final, storage)
    _write_state_dir(storage, rel, step, state)
    return final


def _write_state_dir(storage: RunStorage, rel: str, step: int, state: dict) -> None:
    def files(folder: str) -> list[str]:
        with storage.open_write(f"{folder}/{STATE_FILE}") as f:
            torch.save(state, f)
        storage.write(f"{folder}/meta.json", _json_bytes({"step": step}))
        return [STATE_FILE, "meta.json"]

    if manifest.is_object_store(storage):  # no rename there: a new version and its manifest
        manifest.write_versioned(storage, rel, files, step=step)
        return
    tmp = _sibling(rel, f".{rel.rpartition('/')[2]}.tmp")
    _quiet_delete(storage, tmp)
    files(tmp)
    _replace_dir(storage, tmp, rel)


def readable_state_dir(path: str | Path, storage: RunStorage | None = None) -> Path | str | None:
    """``path``, or the copy ``write_state_dir`` moved aside if a crash came before its replacement
    was renamed in; None when neither exists."""
    store, rel = _at(path, storage)
    found = _readable_rel(store, rel)
    if found is None:
        return None
    if storage is not None:
        return found
    return Path(path) if found == rel else _aside_local(Path(path))


def _aside_local(p: Path) -> Path:
    return p.with_name(f".{p.name}.old")


def _readable_rel(storage: RunStorage, rel: str) -> str | None:
    if manifest.is_object_store(storage):
        return manifest.resolve(storage, rel)
    for r in (rel, _aside_rel(rel)):
        if storage.exists(f"{r}/{STATE_FILE}"):
            return r
    return None


def write_checkpoint(run: RunDir, step: int, state: dict, keep: int) -> Path | str:
    """``checkpoints/step-N`` of ``run``; the oldest beyond ``keep`` deleted once it is in place.
    Where it is: a path on a local run (``RunDir.locate``)."""
    rel = run.checkpoint_rel(step)
    _write_state_dir(run.storage, rel, step, state)
    if manifest.is_object_store(run.storage):  # the older ones' manifests go first, then their objects
        steps = [
            r
            for r in manifest.committed(run.storage, CHECKPOINTS_DIR)
            if r.rpartition("/")[2].startswith("step-")
        ]
        for old in steps[:-keep]:
            manifest.delete(run.storage, old)
        return run.locate(rel)
    done = sorted(n for n in run.storage.list(CHECKPOINTS_DIR) if n.startswith("step-") and n.endswith("/"))
    for old in done[:-keep]:
        _quiet_delete(run.storage, f"{CHECKPOINTS_DIR}/{old.rstrip('/')}")
    return run.locate(rel)


def write_best(run: RunDir, step: int, state: dict) -> None:
    """The keep-best model, ``checkpoints/best``, replaced whole as a checkpoint is."""
    _write_state_dir(run.storage, run.best_rel, step, state)


def _to_host(obj):
    """A deep copy with every tensor in host memory (from a GPU, or cloned on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


class CheckpointUnreadable(Exception):
    """A checkpoint file that exists but cannot be loaded (truncated, overwritten, another format)."""


def read_checkpoint(path: str | Path, storage: RunStorage | None = None) -> dict:
    store, rel = _at(path, storage)
    name = f"{_readable_rel(store, rel) or rel}/{STATE_FILE}"
    file = store.describe(name)
    try:
        with store.open_read(name) as f:
            state = torch.load(f, map_location="cpu", weights_only=False)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # torch.load raises pickle, zip and runtime errors alike
        raise CheckpointUnreadable(f"{file}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointUnreadable(f"{file}: unreadable checkpoint (not a Lepton state)")
    return state


# the longest wait for a background save (the write and the report of it): a filesystem that hangs
# (an NFS server gone) must fail the run with a reason, not hold rank 0 and with it every rank
CHECKPOINT_WAIT_S = 900.0


class CheckpointStuck(Exception):
    """A background checkpoint write did not finish within its bound."""


class AsyncCheckpointer:
    """One save in flight at a time; ``save`` copies the state now and writes it in the background."""

    def __init__(
        self,
        run: RunDir,
        keep: int,
        on_saved: Callable[[int, Path], None],
        timeout_s: float = CHECKPOINT_WAIT_S,
    ):
        self.run, self.keep, self.on_saved, self.timeout_s = run, keep, on_saved, timeout_s
        self._step: int | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, step: int, state: dict) -> None:
        self.wait()
        snapshot = _to_host(state)  # the only part that stalls training
        self._step = step

        def work():
            try:
                path = write_checkpoint(self.run, step, snapshot, self.keep)
                self.on_saved(step, path)
            except BaseException as e:  # surfaced by wait(): a failed save must not pass silently
                self.error = e

        self._thread = threading.Thread(target=work, name="lepton-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)
            if self._thread.is_alive():
                raise CheckpointStuck(
                    f"the checkpoint of step {self._step} was not written within {self.timeout_s:g} s"
                    f" (is {self.run.where()} on a filesystem that hangs?)"
                )
            self._thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def write_model(
    model_dir: str | Path,
    state_dict: dict,
    meta: dict,
    extra_files: dict[str, Path] | None = None,
    storage: RunStorage | None = None,
) -> None:
    """``model/`` = weights (safetensors) + lepton.json, replaced as a whole."""
    storage, rel = _at(model_dir, storage)

    def files(folder: str) -> list[str]:
        # copies: safetensors refuses tensors that share memory (a user model with tied weights)
        weights = save({k: v.detach().cpu().clone() for k, v in state_dict.items()})
        storage.write(f"{folder}/{MODEL_WEIGHTS}", weights, mode=0o600)  # the mode save_file gave it
        del weights
        for name, src in (extra_files or {}).items():
            storage.put(Path(src), f"{folder}/{name}")
        storage.write(f"{folder}/{MODEL_META}", _json_bytes(meta))
        return [MODEL_WEIGHTS, *(extra_files or {}), MODEL_META]

    if manifest.is_object_store(storage):
        manifest.write_versioned(storage, rel, files)
        return
    tmp = _sibling(rel, f".{rel.rpartition('/')[2]}.tmp")
    _quiet_delete(storage, tmp)
    files(tmp)
    _replace_dir(storage, tmp, rel)


def read_model(model_dir: str | Path, storage: RunStorage | None = None) -> tuple[dict, dict]:
    storage, rel = _at(model_dir, storage)
    if manifest.is_object_store(storage):
        rel = manifest.resolve(storage, rel) or rel
    meta = json.loads(storage.read(f"{rel}/{MODEL_META}").decode())
    return load_file(str(storage.local_path(f"{rel}/{MODEL_WEIGHTS}"))), meta
