"""``RemoteStorage``: a run directory reached through the coordinator's file API (coordinator/files.py).

A worker on a host that cannot see the run directory opens ``RunDir(RemoteStorage(...))`` and the rest
of the worker is unchanged: the prepared data, the model factory and the initial weights come down in
chunks, checkpoints and the final model go up in chunks and are committed by the coordinator into the
run's own storage (a local folder or an object store) once their size and SHA-256 match.

Downloads that ``local_path`` makes (the memory-mapped prepared data) are cached on this host by the
SHA-256 the coordinator gives for the file (``LEPTON_CACHE_DIR``, default ``~/.cache/lepton``,
``blobs/AB/ABCD...``): a worker restarted on the same host fetches nothing again, and several workers
of one host share one copy (and its page cache). Every download is checked against its hash before it
is used; a partial one resumes at its size.

Every request is bounded (``timeout_s``); a coordinator that does not answer is retried with backoff for
up to ``retry_s`` (a restarting coordinator), then ``CoordinatorUnreachable``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import httpx

from .client import CoordinatorUnreachable, verify_with
from .errors import LeptonError
from .protocol import CREDENTIAL_HEADER

CHUNK = 8 << 20  # bytes per request (the server takes up to 16 MiB)


class Fenced(LeptonError):
    """This worker was declared lost (or left): the run no longer takes its writes, and it stops."""


def cache_root() -> Path:
    return Path(os.environ.get("LEPTON_CACHE_DIR") or Path.home() / ".cache" / "lepton")


class RemoteStorage:
    """``RunStorage`` over HTTP. ``where`` is the run directory as the coordinator names it (a path on
    its host, or a URL), so messages and the paths a worker reports read as on the coordinator."""

    local_root: Path | None = None

    def __init__(
        self,
        url: str,
        token: str,
        worker_id: str,
        credential: str,
        where: str,
        *,
        timeout_s: float = 60.0,
        retry_s: float = 60.0,
        cache_dir: Path | None = None,
        ca: str | None = None,
    ):
        self.url, self.where, self.worker_id = url.rstrip("/"), where.rstrip("/"), worker_id
        self.retry_s = retry_s
        self.cache_dir = (cache_dir or cache_root()) / "blobs"
        # httpx.Client is safe to share between threads (rank 0's checkpoint thread and the loop)
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {token}", CREDENTIAL_HEADER: credential},
            verify=verify_with(ca),  # the run's CA when the coordinator serves TLS
        )

    def __repr__(self) -> str:
        return f"RemoteStorage({self.url!r}, {self.where!r})"

    def describe(self, rel: str = "") -> str:
        return f"{self.where}/{rel}" if rel else self.where

    # --- HTTP ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, params: dict | None = None, **kw) -> httpx.Response:
        params = {"worker_id": self.worker_id, **(params or {})}
        deadline, delay = time.monotonic() + self.retry_s, 0.2
        while True:
            try:
                r = self._http.request(method, path, params=params, **kw)
            except httpx.TransportError as e:
                if time.monotonic() + delay > deadline:
                    raise CoordinatorUnreachable(f"cannot reach the coordinator at {self.url}: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if r.status_code == 404:
                raise FileNotFoundError(errno.ENOENT, r.json().get("detail", "not found"), path)
            if r.status_code == 410:
                raise Fenced(f"the coordinator at {self.url} refused a write: {r.json().get('detail', '')}")
            if r.status_code == 409:
                raise FileExistsError(errno.EEXIST, r.json().get("detail", "exists"), path)
            if r.status_code >= 400:
                raise LeptonError(f"coordinator {method} {path}: HTTP {r.status_code}: {r.text[:200]}")
            return r

    def _stat(self, rel: str) -> dict:
        return self._request("GET", "/v1/files/stat", params={"name": rel}).json()

    def _file_stat(self, rel: str) -> dict:
        st = self._stat(rel)
        if not st["exists"] or st["is_dir"]:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.describe(rel))
        return st

    def _download(self, rel: str, size: int, f: BinaryIO, start: int = 0) -> None:
        offset = start
        while offset < size:
            r = self._request(
                "GET", "/v1/files/read", params={"name": rel, "offset": offset, "length": CHUNK}
            )
            if not r.content:
                raise OSError(f"{self.describe(rel)}: the file changed while it was read")
            f.write(r.content)
            offset += len(r.content)

    # --- reads ---------------------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def open_read(self, rel: str) -> BinaryIO:
        """The file downloaded into an anonymous temporary file, checked against its hash."""
        st = self._file_stat(rel)
        f = tempfile.TemporaryFile()
        try:
            self._download(rel, st["size"], f)
            f.seek(0)
            _check(f, st["sha256"], self.describe(rel))
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f  # type: ignore[return-value]

    def local_path(self, rel: str) -> Path:
        st = self._file_stat(rel)
        digest = st["sha256"]
        blob = self.cache_dir / digest[:2] / digest
        if blob.is_file() and blob.stat().st_size == st["size"]:
            return blob
        blob.parent.mkdir(parents=True, exist_ok=True)
        # one partial download per process: two workers of a host fetching at once do not interleave
        part = blob.with_name(f"{digest}.{os.getpid()}.part")
        start = part.stat().st_size if part.is_file() else 0
        with open(part, "ab") as f:
            self._download(rel, st["size"], f, start)
        with open(part, "rb") as f:
            try:
                _check(f, digest, self.describe(rel))
            except OSError:
                part.unlink(missing_ok=True)
                raise
        os.replace(part, blob)
        return blob

    def exists(self, rel: str) -> bool:
        r = self._request("GET", "/v1/files/stat", params={"name": rel, "digest": "false"})
        return bool(r.json()["exists"])

    def list(self, rel: str = "") -> list[str]:
        return list(self._request("GET", "/v1/files/list", params={"name": rel}).json()["names"])

    def modified(self, rel: str = "") -> float:
        raise OSError(f"{self.describe(rel)}: the coordinator's file API gives no modification times")

    # --- writes --------------------------------------------------------------------------------------
    def _upload(self, src: BinaryIO, rel: str, create_only: bool = False) -> None:
        src.seek(0)
        h, size = hashlib.sha256(), 0
        uid = secrets.token_hex(16)
        while block := src.read(CHUNK):
            self._request("PUT", f"/v1/files/upload/{uid}", params={"offset": size}, content=block)
            h.update(block)
            size += len(block)
        body = {"upload_id": uid, "name": rel, "size": size, "sha256": h.hexdigest()}
        if size == 0:  # an empty file: the spool is created by its first (empty) chunk
            self._request("PUT", f"/v1/files/upload/{uid}", params={"offset": 0}, content=b"")
        self._request("POST", "/v1/files/commit", json={**body, "create_only": create_only})

    @contextlib.contextmanager
    def open_write(self, rel: str, *, mode: int | None = None) -> Iterator[BinaryIO]:
        # spooled here, then uploaded and committed whole: a block that raises uploads nothing
        with tempfile.TemporaryFile() as f:
            yield f  # type: ignore[misc]
            f.flush()
            self._upload(f, rel)  # type: ignore[arg-type]

    def write(self, rel: str, data: bytes, *, mode: int | None = None, create_only: bool = False) -> None:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            self._upload(f, rel, create_only)  # type: ignore[arg-type]

    def put(self, src: Path, rel: str, *, link: bool = False) -> None:
        with open(src, "rb") as f:
            self._upload(f, rel)

    def delete(self, rel: str) -> None:
        self._request("POST", "/v1/files/delete", json={"name": rel})

    def move(self, src: str, dst: str) -> None:
        self._request("POST", "/v1/files/move", json={"src": src, "dst": dst})

    def append(self, rel: str, data: bytes) -> None:
        raise PermissionError(f"{self.describe(rel)}: a worker does not append to the run's files")

    def open_append(self, rel: str) -> BinaryIO:
        raise PermissionError(f"{self.describe(rel)}: a worker does not append to the run's files")

    def close(self) -> None:
        self._http.close()


def _check(f: BinaryIO, digest: str, where: str) -> None:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    if h.hexdigest() != digest:
        raise OSError(f"{where}: the download does not match its SHA-256 (changed or corrupted in transit)")


__all__ = ["Fenced", "RemoteStorage", "cache_root"]
