"""The run directory: the one object that owns every path of a run (design.md §4).

Every path at the top of a run directory, and every folder in it, comes from ``RunDir``; the files inside
data/, model/, checkpoints/ and logs/ are named by the one module that writes them (PreparedData, the
checkpoint writer, the local-worker launcher). Every file that a crash could leave half-written is
written to a temporary name and renamed (invariant 4).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..errors import LeptonError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFAULT_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _DEFAULT_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)                # the rename itself survives a crash only once its folder is synced


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:      # some network and FUSE filesystems cannot sync a folder: nothing more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl(path: Path) -> Iterator[dict]:
    """Lines of a JSON-lines file; a torn last line (crash mid-append) is skipped."""
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def new_token() -> str:
    return secrets.token_urlsafe(32)


class RunDir:
    """Paths and small-file I/O of one run. See design.md §4 for the layout (a public contract)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # --- paths -------------------------------------------------------------------------------
    @property
    def job_yaml(self) -> Path: return self.root / "job.yaml"
    @property
    def state_json(self) -> Path: return self.root / "state.json"
    @property
    def events_jsonl(self) -> Path: return self.root / "events.jsonl"
    @property
    def metrics_jsonl(self) -> Path: return self.root / "metrics.jsonl"
    @property
    def data_dir(self) -> Path: return self.root / "data"
    @property
    def checkpoints_dir(self) -> Path: return self.root / "checkpoints"
    @property
    def model_dir(self) -> Path: return self.root / "model"
    @property
    def summary_json(self) -> Path: return self.root / "summary.json"
    @property
    def exports_dir(self) -> Path: return self.root / "exports"
    @property
    def token_file(self) -> Path: return self.root / "token"
    @property
    def factory_pickle(self) -> Path: return self.root / "model_factory.pkl"
    @property
    def data_from_file(self) -> Path: return self.root / "data_from"    # the run whose prepared data it shares
    @property
    def init_weights(self) -> Path: return self.root / "init_weights.safetensors"   # its copy of model.init_weights
    @property
    def logs_dir(self) -> Path: return self.root / "logs"          # local workers' output (worker-K.log)
    @property
    def finetune_dir(self) -> Path: return self.exports_dir / "finetune"   # the pruned model's fine-tune run
    @property
    def tensorboard_dir(self) -> Path: return self.root / "tensorboard"

    @property
    def best_dir(self) -> Path:
        """The best model so far by the keep-best metric (a checkpoint kept apart from the rotation)."""
        return self.checkpoints_dir / "best"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:09d}"

    # --- queries -----------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """True when the folder already holds a run that a new one must not overwrite."""
        return self.state_json.exists() or self.job_yaml.exists()

    def read_state(self) -> dict:
        if not self.state_json.exists():
            return {}
        try:
            state = json.loads(self.state_json.read_text())
        except (OSError, ValueError) as e:
            raise LeptonError(f"{self.state_json}: unreadable run state ({e})") from None
        if not isinstance(state, dict):
            raise LeptonError(f"{self.state_json}: unreadable run state (not a JSON object)")
        return state

    def read_job_dict(self) -> dict:
        return yaml.safe_load(self.job_yaml.read_text())

    # --- writes ------------------------------------------------------------------------------
    def write_job(self, job_dict: dict) -> None:
        atomic_write_bytes(self.job_yaml, yaml.safe_dump(job_dict, sort_keys=False).encode())

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_json, state)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_json, summary)

    def append_jsonl(self, path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")

    def lock(self) -> "RunLock":
        """Hold the run for this process: while it lives, another coordinator on this directory is
        refused (two would write the same state, events and checkpoints)."""
        return RunLock(self.root / ".lock")

    def create_token(self, token: str | None = None) -> str:
        """The run's bearer token in ``token`` (mode 0600): the existing one on resume, else ``token``
        or a fresh random one."""
        if self.token_file.exists():
            return self.token_file.read_text().strip()
        token = token or new_token()
        atomic_write_bytes(self.token_file, (token + "\n").encode(), mode=0o600)
        return token


class RunLock:
    """An exclusive ``flock`` on a file in the run directory, held until ``release`` or the end of the
    process (a crash included: the kernel drops it, so a stale lock never blocks a resume)."""

    def __init__(self, path: Path):
        try:
            self._f = open(path, "a")
        except OSError as e:
            raise LeptonError(f"{path.parent}: cannot write in the run directory ({e.strerror or e})") from None
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return            # a file system without locks (some NFS/FUSE): run unguarded, as before
            self._f.close()
            raise LeptonError(f"{path.parent}: another lepton process is running this run (wait for it to end,"
                              " or stop it with Ctrl-C)") from None

    def release(self) -> None:
        if not self._f.closed:
            self._f.close()          # closing the file drops the lock
