"""The storage seam: every byte of a run directory is written and read through one ``RunStorage``.

``RunDir`` (rundir.py) is the one owner of a run's names; it hands them, as ``/``-separated strings
relative to the run's root, to a ``RunStorage`` that does the I/O. Two implementations:

- ``LocalStorage(root)``: a folder on this machine. A write goes to a temporary name in the same folder,
  is fsynced, renamed over the target, and the folder is fsynced (the rename survives a crash only
  once its folder is synced): a reader sees the old file or the new one, never a torn one
  (invariant 4). An append is one ``write`` on a file opened for appending, with no fsync (a torn last
  line after a crash is skipped by the readers, ``read_jsonl``).
- ``FsspecStorage(url)``: any fsspec filesystem (``memory://``, ``file://``, ``s3://``, ``gs://`` ...).
  On a filesystem with a cheap rename (local, memory, sftp, hdfs ...) a write goes to a temporary
  name and is moved over the target, as above, without the fsyncs (the filesystem's own durability).
  On an object store (s3, gs, azure: ``OBJECT_STORES``) a write is one upload of the whole object,
  which the store makes visible only once complete (a rename there is a copy and a delete, no more
  atomic than the upload itself). An object cannot be appended to either: there an append goes into
  segments (``NAME.parts/<time>-<writer>``, each rewritten whole while it grows, a new one from
  every process and every ``SEGMENT_BYTES``), uploaded at most ``APPEND_FLUSH_S`` after it was
  appended (a crash loses at most that much of events.jsonl, metrics.jsonl or a log), and a read of
  ``NAME`` is the segments' concatenation in order.

The narrow part is the protocol: write (whole bytes, or streamed through ``open_write``), ``put`` (a
local file), read (whole, streamed with ``open_read``, or through ``local_path``), ``list``, ``exists``,
``delete`` (a file or a tree), append, ``move``. No folders need creating: a write creates the folders
above it. ``write(..., create_only=True)`` refuses to replace an existing file: on an object store a
checkpoint is committed by a create-only manifest written after its objects (the object-storage stage).

``local_path`` is the escape hatch for readers that need a real file on this machine: the prepared
data is memory-mapped (``np.load(mmap_mode='r')``; its page cache is shared by the local workers) and
the final model's safetensors is memory-mapped too. ``LocalStorage`` answers with the file itself;
``FsspecStorage`` downloads the file once into a local cache folder (keyed by the file's URL and its
``ukey``: size, time or ETag) and answers with the copy. Files of a run are only ever replaced whole
(by a rename or a new upload), never changed in place, so a cached copy keyed that way stays right.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol, runtime_checkable

from ..errors import LeptonError, first_line
from .segments import PARTS, SEGMENT_BYTES, Segment, SegmentFile, flush_loop


@runtime_checkable
class RunStorage(Protocol):
    """Where the files of one run live. ``rel`` is a ``/``-separated name relative to the run's root
    (``"state.json"``, ``"checkpoints/step-000000040/state.pt"``); ``""`` is the root itself."""

    local_root: Path | None
    """The run's folder on this machine's disk, or None when the run is elsewhere (an object store)."""

    def describe(self, rel: str = "") -> str:
        """``rel`` as a user reads it in a message: a local path, or a URL."""
        ...

    def write(self, rel: str, data: bytes, *, mode: int | None = None, create_only: bool = False) -> None:
        """``rel`` holds ``data`` or, after a crash at any instant, what it held before (invariant 4).
        ``mode``: its permission bits where the storage has them (the token's 0600). ``create_only``:
        raise FileExistsError instead of replacing an existing ``rel``."""
        ...

    def open_write(self, rel: str, *, mode: int | None = None) -> contextlib.AbstractContextManager[BinaryIO]:
        """``write`` for data too large to hold twice (a checkpoint's ``torch.save``): a binary file to
        write into; ``rel`` is replaced when the block exits without an exception, untouched if not."""
        ...

    def put(self, src: Path, rel: str, *, link: bool = False) -> None:
        """The local file ``src`` copied to ``rel``, atomically as ``write``. ``link``: a hard link
        where the storage is the same local file system (safe for files that are only ever replaced
        by a rename, never written in place, as everything here is)."""
        ...

    def read(self, rel: str) -> bytes:
        """The whole of ``rel``; FileNotFoundError when there is none."""
        ...

    def open_read(self, rel: str) -> BinaryIO:
        """``rel`` opened for streaming, seekable reads; FileNotFoundError when there is none."""
        ...

    def local_path(self, rel: str) -> Path:
        """A file on this machine's disk holding ``rel``, for readers that memory-map (the prepared
        data, safetensors): the file itself when local, else a cached download. FileNotFoundError
        when there is none."""
        ...

    def exists(self, rel: str) -> bool:
        """A file or a folder named ``rel``."""
        ...

    def list(self, rel: str = "") -> list[str]:
        """The names directly inside the folder ``rel``, sorted; a folder's name ends with ``/`` (as an
        object store's common prefix does). ``[]`` when there is no such folder."""
        ...

    def delete(self, rel: str) -> None:
        """``rel`` removed, a file or a whole folder; nothing when there is none."""
        ...

    def append(self, rel: str, data: bytes) -> None:
        """``data`` (whole lines) added at the end of ``rel``, created if missing."""
        ...

    def open_append(self, rel: str) -> BinaryIO:
        """``rel`` opened for appending (a log a process writes line by line); the caller closes it."""
        ...

    def move(self, src: str, dst: str) -> None:
        """``src`` (a file or a folder) renamed to ``dst``, which must not exist; durable on return
        where the storage syncs. Atomic locally; on an object store a copy then a delete."""
        ...

    def modified(self, rel: str = "") -> float:
        """When ``rel`` last changed (seconds since the epoch; for ``lepton runs``); OSError if unknown."""
        ...


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DEFAULT_MODE = 0o666 & ~_umask()


def fsync_dir(path: Path) -> None:
    """The folder's entries (a rename, a new file) made durable; a no-op where the file system cannot."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network and FUSE filesystems cannot sync a folder: nothing more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _check_rel(rel: str) -> str:
    parts = rel.split("/") if rel else []
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a name relative to the run's root: {rel!r}")
    return rel


class LocalStorage:
    """A run directory in a folder of this machine (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.local_root: Path | None = self.root

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, rel: str) -> Path:
        return self.root / _check_rel(rel) if rel else self.root

    def describe(self, rel: str = "") -> str:
        return str(self._path(rel))

    # --- writes ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _temp_file(self, path: Path, mode: int | None) -> Iterator[tuple[BinaryIO, Path]]:
        """A temporary file beside ``path``, written by the block and fsynced; removed if the block
        raises or once the caller's commit (a rename or a link) is done."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, _DEFAULT_MODE if mode is None else mode)
            with os.fdopen(fd, "wb") as f:
                yield f, Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @contextlib.contextmanager
    def open_write(self, rel: str, *, mode: int | None = None) -> Iterator[BinaryIO]:
        path = self._path(rel)
        with self._temp_file(path, mode) as (f, tmp):
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash only once its folder is synced

    def write(self, rel: str, data: bytes, *, mode: int | None = None, create_only: bool = False) -> None:
        if not create_only:
            with self.open_write(rel, mode=mode) as f:
                f.write(data)
            return
        path = self._path(rel)  # a complete file linked to the name: a link refuses an existing one
        with self._temp_file(path, mode) as (f, tmp):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.link(tmp, path)
        fsync_dir(path.parent)

    def put(self, src: Path, rel: str, *, link: bool = False) -> None:
        path = self._path(rel)
        if link:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # a link refuses an existing name (left by an interrupted copy)
            try:
                os.link(src, path)
                fsync_dir(path.parent)
                return
            except OSError:
                pass  # another file system: copy it
        with open(src, "rb") as s, self.open_write(rel) as f:
            shutil.copyfileobj(s, f)

    def append(self, rel: str, data: bytes) -> None:
        with self.open_append(rel) as f:
            f.write(data)

    def open_append(self, rel: str) -> BinaryIO:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")

    def move(self, src: str, dst: str) -> None:
        s, d = self._path(src), self._path(dst)
        d.parent.mkdir(parents=True, exist_ok=True)
        s.rename(d)
        fsync_dir(d.parent)

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # --- reads -------------------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def open_read(self, rel: str) -> BinaryIO:
        return open(self._path(rel), "rb")

    def local_path(self, rel: str) -> Path:
        path = self._path(rel)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        return path

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def modified(self, rel: str = "") -> float:
        return self._path(rel).stat().st_mtime

    def list(self, rel: str = "") -> list[str]:
        try:
            entries = list(os.scandir(self._path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name + "/" if e.is_dir() else e.name for e in entries)


OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
"""fsspec protocols whose rename is a copy and a delete: there a write is one upload (see the module)."""


def is_url(where: str | os.PathLike) -> bool:
    return isinstance(where, str) and "://" in where


def open_storage(where: str | os.PathLike, **storage_options) -> "RunStorage":
    """The storage of a run directory given as a user gives it: a URL (``s3://bucket/run``,
    ``memory://run``: ``FsspecStorage``) or a local path (``LocalStorage``). A URL whose filesystem
    is not installed (s3fs for s3://) is one line that names the package."""
    if not is_url(where):
        return LocalStorage(Path(where).resolve())
    try:
        return FsspecStorage(str(where), **storage_options)
    except ImportError as e:
        hint = " (pip install 'lepton[s3]')" if str(where).startswith(("s3://", "s3a://")) else ""
        raise LeptonError(f"{where}: cannot open this storage URL: {first_line(e)}{hint}") from None
    except ValueError as e:  # an unknown protocol
        raise LeptonError(f"{where}: cannot open this storage URL: {first_line(e)}") from None


class FsspecStorage:
    """A run directory on any fsspec filesystem, ``url`` its root (``memory://run``, ``s3://bucket/run``).

    ``object_store``: write with one upload (True) or a temporary name and a move (False); by default,
    True for the protocols in ``OBJECT_STORES``. ``cache_dir``: where ``local_path`` keeps its
    downloads (by default a folder under the system's temporary folder). Permission bits (``mode``)
    are not set: access on a remote store is the store's (its ACLs, the bucket's policy)."""

    def __init__(
        self,
        url: str,
        *,
        object_store: bool | None = None,
        cache_dir: str | Path | None = None,
        **storage_options,
    ):
        import fsspec

        self.url = url.rstrip("/")
        if self.url.partition("://")[0] in OBJECT_STORES:
            # another process's writes (a checkpoint by rank 0, a worker's log) must be listed as they
            # come: s3fs would otherwise answer a listing from its cache for the life of the process
            storage_options.setdefault("use_listings_cache", False)
        self.fs, path = fsspec.core.url_to_fs(self.url, **storage_options)
        self.base = path.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.object_store = (
            any(p in OBJECT_STORES for p in protocols) if object_store is None else object_store
        )
        self.cache_dir = (
            Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "lepton-storage-cache"
        )
        self.local_root: Path | None = None
        self._segments: dict[str, Segment] = {}
        self._append_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _path(self, rel: str) -> str:
        return f"{self.base}/{_check_rel(rel)}" if rel else self.base

    def describe(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def _temp_for(self, path: str) -> str:
        folder, _, name = path.rpartition("/")
        return f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"

    # --- writes ------------------------------------------------------------------------------------
    def _parent(self, path: str) -> None:
        if not self.object_store:
            self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, rel: str, *, mode: int | None = None) -> Iterator[BinaryIO]:
        path = self._path(rel)
        self._parent(path)
        if self.object_store:
            # spooled to a local temporary file, then one upload: the object appears only once the upload
            # is complete, and a block that raises uploads nothing (an fsspec file's close would
            # commit what was written so far)
            with tempfile.NamedTemporaryFile(prefix=".lepton-upload.", suffix=".tmp") as f:
                yield f  # type: ignore[misc]
                f.flush()
                self.fs.put_file(f.name, path)
            return
        tmp = self._temp_for(path)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def write(self, rel: str, data: bytes, *, mode: int | None = None, create_only: bool = False) -> None:
        path = self._path(rel)
        if create_only:
            # on an object store, a conditional upload where the filesystem offers one (mode "xb"); else,
            # and on other filesystems, a check then the atomic write below: safe against a crash, not
            # against a second writer of the same name at the same instant (there is one writer per name)
            if self.object_store:
                try:
                    with self.fs.open(path, "xb") as f:
                        f.write(data)
                    return
                except (ValueError, NotImplementedError, TypeError):
                    pass
            if self.fs.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), self.describe(rel))
        if self.object_store:
            self.fs.pipe_file(path, data)
            return
        with self.open_write(rel, mode=mode) as f:
            f.write(data)

    def put(self, src: Path, rel: str, *, link: bool = False) -> None:
        path = self._path(rel)
        self._parent(path)
        if self.object_store:
            self.fs.put_file(str(src), path)
            return
        tmp = self._temp_for(path)
        try:
            self.fs.put_file(str(src), tmp)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def append(self, rel: str, data: bytes) -> None:
        if not self.object_store:
            with self.open_append(rel) as f:
                f.write(data)
            return
        _check_rel(rel)
        with self._append_lock:
            seg = self._segments.get(rel)
            if seg is not None and seg.data and len(seg.data) + len(data) > SEGMENT_BYTES:
                self._upload(seg)
                seg = None
            if seg is None:
                seg = self._segments[rel] = Segment(rel)
            seg.data += data
            seg.dirty = True
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=flush_loop,
                    args=(weakref.ref(self), self._stop),
                    name="lepton-append-flush",
                    daemon=True,
                )
                self._flusher.start()

    def _upload(self, seg: Segment) -> None:
        self.fs.pipe_file(self._path(seg.rel), bytes(seg.data))
        seg.dirty = False

    def flush(self) -> None:
        """Every appended line uploaded now (the journal calls it when the run ends)."""
        with self._append_lock:
            for seg in self._segments.values():
                if seg.dirty:
                    self._upload(seg)

    def close(self) -> None:
        """``flush``, and the background flusher stopped."""
        self.flush()
        self._stop.set()

    def open_append(self, rel: str) -> BinaryIO:
        """A file to append to. On an object store, segments (``append``); elsewhere mode ``ab`` as
        the filesystem implements it (a true append locally and in memory)."""
        if self.object_store:
            return SegmentFile(self, rel)  # type: ignore[return-value]
        path = self._path(rel)
        self._parent(path)
        return self.fs.open(path, "ab")

    def _parts(self, rel: str) -> list[str]:
        """The segments of ``rel`` on an object store, in order (this process's pending ones flushed)."""
        if not self.object_store:
            return []
        if rel in self._segments:
            self.flush()
        folder = self._path(f"{rel}{PARTS}")
        if not self.fs.isdir(folder):
            return []
        return sorted(i["name"] for i in self.fs.ls(folder, detail=True) if i["type"] == "file")

    def move(self, src: str, dst: str) -> None:
        s, d = self._path(src), self._path(dst)
        self._parent(d)
        self.fs.mv(s, d, recursive=self.fs.isdir(s))

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        if self.fs.isdir(path):
            self.fs.rm(path, recursive=True)
        elif self.fs.exists(path):
            self.fs.rm_file(path)
        if self.object_store and rel and self.fs.isdir(self._path(f"{rel}{PARTS}")):
            with self._append_lock:
                self._segments.pop(rel, None)
            self.fs.rm(self._path(f"{rel}{PARTS}"), recursive=True)

    # --- reads -------------------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        path = self._path(rel)
        if not self.fs.isfile(path):
            parts = self._parts(rel)
            if parts:
                return b"".join(self.fs.cat_file(p) for p in parts)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.describe(rel))
        return self.fs.cat_file(path)

    def open_read(self, rel: str) -> BinaryIO:
        path = self._path(rel)
        if not self.fs.isfile(path):
            if self._parts(rel):
                return io.BytesIO(self.read(rel))
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.describe(rel))
        return self.fs.open(path, "rb")

    def local_path(self, rel: str) -> Path:
        path = self._path(rel)
        if not self.fs.isfile(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.describe(rel))
        key = hashlib.sha256(f"{self.describe(rel)}\0{self.fs.ukey(path)}".encode()).hexdigest()[:24]
        local = self.cache_dir / key / rel.rpartition("/")[2]
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
            try:
                self.fs.get_file(path, str(tmp))
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
        return local

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel)) or bool(self.object_store and self._parts(rel))

    def modified(self, rel: str = "") -> float:
        parts = self._parts(rel)
        info = self.fs.info(parts[-1] if parts else self._path(rel))  # an appended file: its newest segment
        t = next(
            (info[k] for k in ("LastModified", "mtime", "last_modified", "created") if info.get(k)), None
        )
        if t is None:
            raise OSError(f"{self.describe(rel)}: the store gives no modification time")
        return t.timestamp() if hasattr(t, "timestamp") else float(t)

    def list(self, rel: str = "") -> list[str]:
        """As ``RunStorage.list``; on an object store an appended file (its ``NAME.parts/``) is listed
        as the file ``NAME``."""
        path = self._path(rel)
        if not self.fs.isdir(path):
            return []
        names = set()
        for info in self.fs.ls(path, detail=True):
            name = info["name"].rstrip("/").rpartition("/")[2]
            if not name:
                continue
            if self.object_store and info["type"] == "directory" and name.endswith(PARTS):
                names.add(name[: -len(PARTS)])
            else:
                names.add(name + "/" if info["type"] == "directory" else name)
        return sorted(names)
