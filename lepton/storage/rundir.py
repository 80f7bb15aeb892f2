"""The run directory: the one object that owns every path of a run (a public contract: users and
tools read it).

Every name at the top of a run directory, and every folder in it, comes from ``RunDir``; the files inside
data/, model/, checkpoints/ and logs/ are named by the one module that writes them (PreparedData, the
checkpoint writer, the local-worker launcher). Every byte goes through the run's ``RunStorage``
(backend.py): a folder of this machine (``LocalStorage``, the default) or any fsspec filesystem
(``FsspecStorage``). Every file that a crash could leave half-written is written to a temporary name
and renamed (invariant 4).

The ``Path`` properties (``job_yaml``, ``data_dir`` ...) are for callers that still need a local path;
they raise on a run that is not on this machine's disk. The names relative to the root are the
constants below, and the methods take them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import yaml

from ..errors import LeptonError
from .backend import LocalStorage, RunStorage, fsync_dir, open_storage

__all__ = [
    "RunDir",
    "RunLock",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "read_jsonl",
    "new_token",
]

# names relative to the run's root (a public contract: docs/architecture.md, "Storage")
JOB_YAML = "job.yaml"
STATE_JSON = "state.json"
EVENTS_JSONL = "events.jsonl"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"
TOKEN = "token"
WORKER_KEY = "worker_key"  # the coordinator's key for per-worker credentials (auth.py)
FACTORY_PICKLE = "model_factory.pkl"
DATA_FROM = "data_from"
INIT_WEIGHTS = "init_weights.safetensors"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
EXPORTS_DIR = "exports"
LOGS_DIR = "logs"
TENSORBOARD_DIR = "tensorboard"
LOCK = ".lock"


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path`` (``LocalStorage.write``;
    for files outside a run directory: exports, predictions)."""
    path = Path(path)
    LocalStorage(path.parent).write(path.name, data, mode=mode)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, _json_bytes(obj))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_jsonl(path: Path) -> Iterator[dict]:
    """Lines of a JSON-lines file; a torn last line (crash mid-append) is skipped."""
    path = Path(path)
    return _jsonl_records(LocalStorage(path.parent), path.name)


def _jsonl_records(storage: RunStorage, rel: str) -> Iterator[dict]:
    try:
        f = storage.open_read(rel)
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                yield json.loads(line.decode())
            except ValueError:  # a torn line: JSON cut short, or a multi-byte character cut
                continue


def new_token() -> str:
    return secrets.token_urlsafe(32)


class RunDir:
    """Names and small-file I/O of one run. The layout is a public contract (the README lists it).

    ``RunDir(path)`` is a run in a local folder; ``RunDir(url)`` one on any fsspec filesystem
    (``RunDir("s3://bucket/run")``: ``FsspecStorage``; never a local folder named ``s3:``);
    ``RunDir(storage)`` one on any ``RunStorage``."""

    def __init__(self, root: str | os.PathLike | RunStorage):
        if isinstance(root, (str, os.PathLike)):
            self.storage: RunStorage = open_storage(root)
        else:
            self.storage = root

    @property
    def is_local(self) -> bool:
        """The run is a folder of this machine (else: an object store, another host's folder)."""
        return self.storage.local_root is not None

    @property
    def location(self) -> Path | str:
        """The run as it is reported to the user: its folder, or its URL."""
        return self.root if self.is_local else self.where()

    def flush(self) -> None:
        """Appended lines (events, metrics, logs) uploaded now where the storage queues them (an
        object store's segments); nothing to do on a local folder."""
        flush = getattr(self.storage, "flush", None)
        if flush is not None:
            flush()

    def __repr__(self) -> str:
        return f"RunDir({self.storage!r})"

    def where(self, rel: str = "") -> str:
        """``rel`` as a message names it: a local path, or a URL."""
        return self.storage.describe(rel)

    def locate(self, rel: str) -> Path | str:
        """``rel`` as the run reports it (in state.json, to the coordinator): a path on a local run,
        a URL otherwise."""
        return self.root / rel if self.storage.local_root is not None else self.where(rel)

    def relative(self, located: str | os.PathLike) -> str:
        """The name relative to the root of a file that ``locate`` (or the coordinator) reported."""
        located, root = str(located), self.where()
        if located == root:
            return ""
        if located.startswith(root.rstrip("/") + "/"):
            return located[len(root.rstrip("/")) + 1 :]
        raise LeptonError(f"{located}: not in the run directory {root}")

    # --- paths (local runs) -----------------------------------------------------------------
    @property
    def root(self) -> Path:
        if self.storage.local_root is None:
            raise LeptonError(
                f"{self.where()}: not a folder on this machine (this needs a local run directory)"
            )
        return self.storage.local_root

    @property
    def job_yaml(self) -> Path:
        return self.root / JOB_YAML

    @property
    def state_json(self) -> Path:
        return self.root / STATE_JSON

    @property
    def events_jsonl(self) -> Path:
        return self.root / EVENTS_JSONL

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / METRICS_JSONL

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def summary_json(self) -> Path:
        return self.root / SUMMARY_JSON

    @property
    def exports_dir(self) -> Path:
        return self.root / EXPORTS_DIR

    @property
    def token_file(self) -> Path:
        return self.root / TOKEN

    @property
    def factory_pickle(self) -> Path:
        return self.root / FACTORY_PICKLE

    @property
    def data_from_file(self) -> Path:
        return self.root / DATA_FROM  # the run whose prepared data it shares

    @property
    def init_weights(self) -> Path:
        return self.root / INIT_WEIGHTS  # its copy of model.init_weights

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS_DIR  # local workers' output (worker-K.log)

    @property
    def finetune_dir(self) -> Path:
        return self.exports_dir / "finetune"  # the pruned model's fine-tune run

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def best_dir(self) -> Path:
        """The best model so far by the keep-best metric (a checkpoint kept apart from the rotation)."""
        return self.root / self.best_rel

    def checkpoint_dir(self, step: int) -> Path:
        return self.root / self.checkpoint_rel(step)

    # --- names (any storage) ----------------------------------------------------------------
    best_rel = f"{CHECKPOINTS_DIR}/best"

    @staticmethod
    def checkpoint_rel(step: int) -> str:
        return f"{CHECKPOINTS_DIR}/step-{step:09d}"

    @staticmethod
    def worker_log_rel(k: int) -> str:
        return f"{LOGS_DIR}/worker-{k}.log"

    # --- queries -----------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """True when the folder already holds a run that a new one must not overwrite."""
        return self.storage.exists(STATE_JSON) or self.storage.exists(JOB_YAML)

    def read_state(self) -> dict:
        try:
            state = json.loads(self.storage.read(STATE_JSON).decode())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise LeptonError(f"{self.where(STATE_JSON)}: unreadable run state ({e})") from None
        if not isinstance(state, dict):
            raise LeptonError(f"{self.where(STATE_JSON)}: unreadable run state (not a JSON object)")
        return state

    def read_job_dict(self) -> dict:
        return yaml.safe_load(self.storage.read(JOB_YAML).decode())

    def events(self) -> Iterator[dict]:
        """events.jsonl's records; a torn last line is skipped."""
        return _jsonl_records(self.storage, EVENTS_JSONL)

    def metrics(self) -> Iterator[dict]:
        """metrics.jsonl's records; a torn last line is skipped."""
        return _jsonl_records(self.storage, METRICS_JSONL)

    def read_data_from(self) -> str | None:
        """The run directory whose prepared data this run shares, if any."""
        try:
            return self.storage.read(DATA_FROM).decode()
        except FileNotFoundError:
            return None

    def read_factory(self) -> bytes | None:
        """The pickled model factory (a callable ``model.factory``), if the run has one."""
        try:
            return self.storage.read(FACTORY_PICKLE)
        except FileNotFoundError:
            return None

    # --- writes ------------------------------------------------------------------------------
    def write_job(self, job_dict: dict) -> None:
        self.storage.write(JOB_YAML, yaml.safe_dump(job_dict, sort_keys=False).encode())

    def write_state(self, state: dict) -> None:
        self.storage.write(STATE_JSON, _json_bytes(state))

    def write_summary(self, summary: dict) -> None:
        self.storage.write(SUMMARY_JSON, _json_bytes(summary))

    def write_factory(self, blob: bytes) -> None:
        self.storage.write(FACTORY_PICKLE, blob)

    def write_data_from(self, source_root: str) -> None:
        self.storage.write(DATA_FROM, source_root.encode())

    def copy_in(self, src: Path, rel: str, *, link: bool = False) -> None:
        """The local file ``src`` copied into the run as ``rel``, atomically (a temporary name, fsync,
        rename); ``link``: a hard link where it can be (``RunStorage.put``)."""
        self.storage.put(Path(src), rel, link=link)

    def copy_init_weights(self, src: Path) -> Path | str:
        """The run's own copy of ``model.init_weights``; where it is."""
        self.copy_in(src, INIT_WEIGHTS)
        return self.locate(INIT_WEIGHTS)

    def append_jsonl(self, path: Path | str, record: dict) -> None:
        """``record`` as one line at the end of ``path`` (one of this run's files: ``metrics_jsonl``,
        ``events_jsonl``, or its name relative to the root)."""
        rel = path if isinstance(path, str) else Path(path).relative_to(self.root).as_posix()
        self.storage.append(rel, (json.dumps(record, default=_json_default) + "\n").encode())

    def append_event(self, record: dict) -> None:
        """One event, durable on return as state.json is: where appends are queued (an object store's
        segments) it is uploaded now; events are few, and a resume reads them."""
        self.append_jsonl(EVENTS_JSONL, record)
        self.flush()

    def append_metric(self, record: dict) -> None:
        self.append_jsonl(METRICS_JSONL, record)

    def worker_log(self, k: int) -> BinaryIO:
        """``logs/worker-K.log`` opened for appending (binary; the caller writes, flushes and closes it)."""
        return self.storage.open_append(self.worker_log_rel(k))

    def lock(self) -> "RunLock | None":
        """Hold the run for this process: while it lives, another coordinator on this directory is
        refused (two would write the same state, events and checkpoints). A local run only: an object
        store has no lock that a crash releases, so there None (docs/architecture.md, "Storage": one
        coordinator per run on object storage is the user's to ensure)."""
        return RunLock(self.root / LOCK) if self.is_local else None

    def create_token(self, token: str | None = None) -> str:
        """The run's bearer token in ``token`` (mode 0600): the existing one on resume, else ``token``
        or a fresh random one."""
        try:
            return self.storage.read(TOKEN).decode().strip()
        except FileNotFoundError:
            pass
        token = token or new_token()
        self.storage.write(TOKEN, (token + "\n").encode(), mode=0o600)
        return token

    def worker_key(self) -> bytes:
        """The coordinator's key for per-worker credentials in ``worker_key`` (mode 0600): the
        existing one on resume (a restarted coordinator still verifies the workers it adopts), else a
        fresh random one. Unlike the token it never leaves the coordinator."""
        try:
            key = self.storage.read(WORKER_KEY).strip()
            if key:
                return key
        except FileNotFoundError:
            pass
        key = new_token().encode()
        self.storage.write(WORKER_KEY, key + b"\n", mode=0o600)
        return key


class RunLock:
    """An exclusive ``flock`` on a file in the run directory, held until ``release`` or the end of the
    process (a crash included: the kernel drops it, so a stale lock never blocks a resume)."""

    def __init__(self, path: Path):
        try:
            self._f = open(path, "a")
        except OSError as e:
            raise LeptonError(
                f"{path.parent}: cannot write in the run directory ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return  # a file system without locks (some NFS/FUSE): run unguarded, as before
            self._f.close()
            raise LeptonError(
                f"{path.parent}: another lepton process is running this run (wait for it to end,"
                " or stop it with Ctrl-C)"
            ) from None

    def release(self) -> None:
        if not self._f.closed:
            self._f.close()  # closing the file drops the lock
