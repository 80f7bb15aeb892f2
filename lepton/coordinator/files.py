"""The run directory served to workers that cannot see it: the coordinator's file API.

A worker needs the coordinator's URL and the token, nothing else (issue 26): when the run directory is
not on its host's disk (another host, another mount namespace, a container) it reaches the run's files
through these routes, behind a ``RunStorage`` of its own (``lepton/remote.py``: ``RemoteStorage``), so
the worker code that reads the prepared data and writes checkpoints is the same in both cases.

- ``GET /v1/files/stat?name=REL[&digest=false]``: whether ``REL`` is there, a file or a folder; a file's
  size and the SHA-256 of its content (``digest=false``: existence alone, nothing read). The hash is
  computed once per version of the file: files of a run are only ever replaced whole, so (path, size,
  mtime) names a version. The worker caches downloads by that hash, so a
  restarted worker on the same host fetches nothing again.
- ``GET /v1/files/read?name=REL&offset=O&length=L``: up to ``CHUNK_MAX`` bytes of a file, so a large
  file travels in chunks, each request bounded in time, and a broken transfer resumes at its offset.
- ``GET /v1/files/list?name=REL``: ``RunStorage.list``.
- ``PUT /v1/files/upload/{id}?offset=O`` (a chunk, in order) then ``POST /v1/files/commit``: an upload
  is spooled on the coordinator's disk and committed to the run's storage in one ``RunStorage.put``
  (atomic as every write of a run: invariant 4) only once its size and SHA-256 match what the worker
  sent; an interrupted upload leaves nothing in the run.
- ``POST /v1/files/delete``, ``POST /v1/files/move``: the checkpoint writer's rotation and renames.

Every route needs the token and a registered worker's credential (``worker_id`` in the query). What a
worker may touch is a short allow-list (``readable``, ``writable``): it reads the job, the prepared data,
the model factory, the initial weights, checkpoints and the model; it writes only under checkpoints/ and
the model's folders. The token and the credential key are never served. A worker the controller has
declared lost, or that left, may no longer write (410, ``Controller.write_refused``): a host cut off and
back cannot put a stale generation's checkpoint into the run (fencing).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..protocol import CREDENTIAL_HEADER
from ..storage.rundir import (
    CHECKPOINTS_DIR,
    DATA_DIR,
    FACTORY_PICKLE,
    INIT_WEIGHTS,
    JOB_YAML,
    MODEL_DIR,
    RunDir,
)

CHUNK_MAX = 16 << 20  # the most one read or upload request carries
MAX_UPLOADS = 16  # spools open at once (rank 0 writes one file at a time; restarts leave stale ones)
UPLOAD_IDLE_S = 600.0  # a spool untouched this long is dropped (its writer died)

_READ_FILES = {JOB_YAML, FACTORY_PICKLE, INIT_WEIGHTS}
_READ_TREES = {DATA_DIR, CHECKPOINTS_DIR, MODEL_DIR}
# the model is written into .model.tmp/ and renamed over model/ (checkpoint.write_model)
_WRITE_TREES = {CHECKPOINTS_DIR, MODEL_DIR, f".{MODEL_DIR}.tmp", f".{MODEL_DIR}.old"}


def _top(rel: str) -> str:
    return rel.split("/", 1)[0]


def readable(rel: str) -> bool:
    return rel in _READ_FILES or _top(rel) in _READ_TREES | _WRITE_TREES


def writable(rel: str) -> bool:
    return ("/" in rel and _top(rel) in _WRITE_TREES) or rel in _WRITE_TREES - {CHECKPOINTS_DIR}


class FileStat(BaseModel):
    exists: bool
    is_dir: bool = False
    size: int = 0
    sha256: str = ""


class CommitRequest(BaseModel):
    upload_id: str = Field(max_length=64)
    name: str = Field(max_length=1024)
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)
    create_only: bool = False


class NameRequest(BaseModel):
    name: str = Field(max_length=1024)


class MoveRequest(BaseModel):
    src: str = Field(max_length=1024)
    dst: str = Field(max_length=1024)


class _Hashes:
    """SHA-256 per version of a file, (path, size, mtime) naming the version."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def of(self, path: Path) -> tuple[int, str]:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            known = _sha256_file(path)
            with self._lock:
                self._known[key] = known
        return st.st_size, known


class _Uploads:
    """Spools of uploads in progress, in a private temporary folder of the coordinator's host."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lepton-uploads-"))
        self._open: dict[str, float] = {}  # id -> last touched (monotonic)
        self._lock = threading.Lock()

    def _drop_idle(self) -> None:
        now = time.monotonic()
        for uid in [u for u, t in self._open.items() if now - t > UPLOAD_IDLE_S]:
            self._forget(uid)

    def _forget(self, uid: str) -> None:
        self._open.pop(uid, None)
        (self.folder / uid).unlink(missing_ok=True)

    def append(self, uid: str, offset: int, data: bytes) -> int:
        with self._lock:
            self._drop_idle()
            if uid not in self._open:
                if offset != 0:
                    raise HTTPException(404, f"no upload {uid} (the coordinator restarted?)")
                if len(self._open) >= MAX_UPLOADS:
                    raise HTTPException(429, "too many uploads in progress")
                (self.folder / uid).touch()
            self._open[uid] = time.monotonic()
            spool = self.folder / uid
            size = spool.stat().st_size
            if offset == size - len(data) and offset >= 0:
                return size  # a retried chunk that had arrived
            if offset != size:
                raise HTTPException(409, f"upload {uid} holds {size} bytes, not {offset}")
            with open(spool, "ab") as f:
                f.write(data)
            return size + len(data)

    @contextlib.contextmanager
    def take(self, uid: str):
        """The spool of ``uid``, removed after the block whatever happens."""
        with self._lock:
            if uid not in self._open:
                raise HTTPException(404, f"no upload {uid} (the coordinator restarted?)")
            self._open.pop(uid)
        spool = self.folder / uid
        try:
            yield spool
        finally:
            spool.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_file_routes(
    app: FastAPI,
    run: RunDir,
    auth,
    check_worker: Callable[[str, Optional[str]], None],
    write_refused: Callable[[str], Optional[str]] = lambda worker_id: None,
):
    """The routes of the module docstring on ``app``; returns the upload spools (``close`` at the end).
    ``write_refused(worker_id)``: why that worker may not write now (``Controller.write_refused``:
    fencing a worker that was declared lost), or None."""
    storage = run.storage
    hashes, uploads = _Hashes(), _Uploads()

    def worker(
        worker_id: str = Query(max_length=128),
        credential: Optional[str] = Header(default=None, alias=CREDENTIAL_HEADER),
    ) -> str:
        check_worker(worker_id, credential)
        return worker_id

    guards = [Depends(auth), Depends(worker)]

    def writer(worker_id: str = Depends(worker)) -> str:
        why = write_refused(worker_id)
        if why:  # 410 Gone: the writer's membership is; 409 stays "that name exists"
            raise HTTPException(410, why)
        return worker_id

    writes = [Depends(auth), Depends(writer)]

    def checked(rel: str, allowed: Callable[[str], bool]) -> str:
        parts = rel.split("/") if rel else []
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise HTTPException(422, f"not a name in the run directory: {rel!r}")
        if not allowed(rel):
            verb = "read" if allowed is readable else "write"
            raise HTTPException(403, f"{rel!r}: not a file workers may {verb}")
        return rel

    # plain ``def`` (or the thread pool): file I/O never holds the event loop that answers heartbeats
    @app.get("/v1/files/stat", dependencies=guards)
    def stat(name: str = Query(max_length=1024), digest: bool = Query(default=True)) -> FileStat:
        rel = checked(name, readable)
        if not storage.exists(rel):
            return FileStat(exists=False)
        if not digest:  # only whether it is there (a checkpoint's rotation): no file read to hash it
            return FileStat(exists=True)
        try:
            size, sha = hashes.of(storage.local_path(rel))
        except (FileNotFoundError, IsADirectoryError):
            return FileStat(exists=True, is_dir=True)
        return FileStat(exists=True, size=size, sha256=sha)

    @app.get("/v1/files/read", dependencies=guards)
    def read(
        name: str = Query(max_length=1024),
        offset: int = Query(default=0, ge=0),
        length: int = Query(default=CHUNK_MAX, ge=0, le=CHUNK_MAX),
    ) -> Response:
        rel = checked(name, readable)
        try:
            with open(storage.local_path(rel), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except (FileNotFoundError, IsADirectoryError):
            raise HTTPException(404, f"{rel}: no such file in the run") from None
        return Response(content=data, media_type="application/octet-stream")

    @app.get("/v1/files/list", dependencies=guards)
    def listing(name: str = Query(default="", max_length=1024)) -> dict:
        return {"names": storage.list(checked(name, readable))}

    @app.put("/v1/files/upload/{upload_id}", dependencies=writes)
    async def upload(request: Request, upload_id: str, offset: int = Query(ge=0)) -> dict:
        if not (8 <= len(upload_id) <= 64 and upload_id.isalnum()):
            raise HTTPException(422, "upload id: 8 to 64 letters and digits")
        data = await request.body()
        if len(data) > CHUNK_MAX:
            raise HTTPException(413, f"a chunk carries at most {CHUNK_MAX} bytes")
        # the spool's write on the thread pool, not on the event loop that answers heartbeats
        return {"size": await run_in_threadpool(uploads.append, upload_id, offset, data)}

    @app.post("/v1/files/commit", dependencies=writes)
    def commit(req: CommitRequest) -> dict:
        rel = checked(req.name, writable)
        with uploads.take(req.upload_id) as spool:
            size = spool.stat().st_size
            if size != req.size or _sha256_file(spool) != req.sha256:
                raise HTTPException(
                    422, f"{rel}: the upload ({size} bytes) does not match the size and SHA-256 sent"
                )
            if req.create_only:
                try:
                    storage.write(rel, spool.read_bytes(), create_only=True)
                except FileExistsError:
                    raise HTTPException(409, f"{rel}: exists") from None
            else:
                storage.put(spool, rel)
        return {"ok": True}

    @app.post("/v1/files/delete", dependencies=writes)
    def delete(req: NameRequest) -> dict:
        storage.delete(checked(req.name, writable))
        return {"ok": True}

    @app.post("/v1/files/move", dependencies=writes)
    def move(req: MoveRequest) -> dict:
        src, dst = checked(req.src, writable), checked(req.dst, writable)
        try:
            storage.move(src, dst)
        except FileNotFoundError:
            raise HTTPException(404, f"{src}: no such file in the run") from None
        except FileExistsError:
            raise HTTPException(409, f"{dst}: exists") from None
        return {"ok": True}

    return uploads
