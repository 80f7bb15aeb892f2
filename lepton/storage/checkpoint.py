"""Checkpoints and the final model, written so that a crash at any instant leaves a usable run.

A checkpoint is written into a hidden temporary folder, fsynced, and renamed to
``checkpoints/step-N`` once complete (the folder it is in synced after the rename); older ones are
deleted only after the new one exists (the last good checkpoint is never overwritten in place,
invariant 4). Saving runs on a background thread after the state has been copied to host memory, so
training stalls only for that copy.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .rundir import RunDir, atomic_write_json, fsync_dir

STATE_FILE = "state.pt"
MODEL_WEIGHTS = "weights.safetensors"
MODEL_META = "lepton.json"


def write_state_dir(final: Path, step: int, state: dict) -> Path:
    """``state`` into the folder ``final``, written beside it and renamed, replacing it whole. Its
    data reaches the disk before the rename does (a crash must not leave a complete-looking folder
    with an empty state file), and a folder of the same step is moved aside, not deleted, until the
    new one is in place (``readable_state_dir`` finds it if a crash came in between)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_json(tmp / "meta.json", {"step": step})
    old = _aside(final)
    if final.exists():            # the same step saved again (e.g. the final save)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def readable_state_dir(path: str | Path) -> Path | None:
    """``path``, or the copy ``write_state_dir`` moved aside if a crash came before its replacement
    was renamed in; None when neither exists."""
    for p in (Path(path), _aside(Path(path))):
        if (p / STATE_FILE).exists():
            return p
    return None


def write_checkpoint(run: RunDir, step: int, state: dict, keep: int) -> Path:
    final = write_state_dir(run.checkpoint_dir(step), step, state)
    done = sorted(p for p in run.checkpoints_dir.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def read_checkpoint(path: str | Path) -> dict:
    file = (readable_state_dir(path) or Path(path)) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as e:      # torch.load raises pickle, zip and runtime errors alike
        raise CheckpointUnreadable(f"{file}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointUnreadable(f"{file}: unreadable checkpoint (not a Lepton state)")
    return state


class AsyncCheckpointer:
    """One save in flight at a time; ``save`` copies the state now and writes it in the background."""

    def __init__(self, run: RunDir, keep: int, on_saved: Callable[[int, Path], None]):
        self.run, self.keep, self.on_saved = run, keep, on_saved
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def save(self, step: int, state: dict) -> None:
        self.wait()
        snapshot = _to_host(state)            # the only part that stalls training

        def work():
            try:
                path = write_checkpoint(self.run, step, snapshot, self.keep)
                self.on_saved(step, path)
            except BaseException as e:   # surfaced by wait(): a failed save must not pass silently
                self.error = e

        self._thread = threading.Thread(target=work, name="lepton-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err


def write_model(model_dir: Path, state_dict: dict, meta: dict, extra_files: dict[str, Path] | None = None) -> None:
    """``model/`` = weights (safetensors) + lepton.json, replaced as a whole."""
    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # copies: safetensors refuses tensors that share memory (a user model with tied weights)
    save_file({k: v.detach().cpu().clone() for k, v in state_dict.items()}, str(tmp / MODEL_WEIGHTS))
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    atomic_write_json(tmp / MODEL_META, meta)
    old = model_dir.with_name(f".{model_dir.name}.old")
    if model_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        model_dir.rename(old)
    tmp.rename(model_dir)
    fsync_dir(model_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_model(model_dir: Path) -> tuple[dict, dict]:
    meta = json.loads((model_dir / MODEL_META).read_text())
    return load_file(str(model_dir / MODEL_WEIGHTS)), meta
