"""Appends on an object store, where an object cannot be appended to: segments (backend.py's module
docstring). ``FsspecStorage.append`` keeps one ``Segment`` per appended name and process, re-uploads it
whole as it grows and starts a new one past ``SEGMENT_BYTES``; ``flush_loop`` uploads what is pending
every ``APPEND_FLUSH_S``; ``SegmentFile`` is ``open_append``'s file (a worker log pumped line by line)."""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backend import FsspecStorage

PARTS = ".parts"  # the folder of an appended file's segments on an object store: NAME.parts/
SEGMENT_BYTES = 4 << 20  # a segment is rewritten whole on each flush: past this, a new one
APPEND_FLUSH_S = 2.0  # the longest an appended line waits before its upload (what a crash may lose)


class Segment:
    """The segment of one appended file that this process is writing (see the module docstring)."""

    def __init__(self, rel: str):
        self.rel = f"{rel}{PARTS}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self.data = bytearray()
        self.dirty = False


class SegmentFile:
    """``open_append``'s file on an object store: each write an ``append`` (segments, flushed in the
    background), ``close`` uploads what is left."""

    def __init__(self, storage: "FsspecStorage", rel: str):
        self.storage, self.rel, self.closed = storage, rel, False

    def write(self, data: bytes) -> int:
        self.storage.append(self.rel, bytes(data))
        return len(data)

    def writelines(self, lines) -> None:
        self.storage.append(self.rel, b"".join(bytes(line) for line in lines))

    def flush(self) -> None:
        pass  # uploads are the flusher's (at most APPEND_FLUSH_S later) and close's

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.storage.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def flush_loop(ref: "weakref.ref[FsspecStorage]", stop: threading.Event) -> None:
    while not stop.wait(APPEND_FLUSH_S):
        storage = ref()
        if storage is None:
            return
        try:
            storage.flush()
        except Exception:  # a store that fails now is retried on the next round (the data stays queued)
            pass
        del storage
