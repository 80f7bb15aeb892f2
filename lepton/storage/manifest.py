"""Committing a folder on an object store: its objects under a fresh prefix, then a create-only manifest.

An object store has no rename, so the write-then-rename of a local checkpoint (invariant 4) becomes:

1. every file of the folder ``REL`` is uploaded under a prefix no one else uses, ``REL.objects-<uuid>/``
   (an object becomes visible only once its upload is complete, so a writer killed mid-upload leaves
   objects no manifest names, never a half-written file under a name that counts);
2. the manifest ``REL.manifest-<version>.json`` (the version one above the newest there) is written
   create-only (``RunStorage.write(create_only=True)``: a conditional put where the store has one): this
   is the commit point, and it lists the prefix and the files;
3. only then are older manifests of ``REL`` deleted, and after them the objects no remaining manifest
   names.

A reader (``resolve``) takes the newest manifest whose files all exist. A crash at any instant leaves
either the previous commit or the new one readable, and leftover objects of an uncommitted write are
removed by the next commit of the same name. Local folders keep the rename (checkpoint.py); this path is
for storages with ``object_store`` set (``FsspecStorage`` on s3, gs, azure ...).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Callable

from .backend import RunStorage

_MANIFEST = re.compile(r"^(?P<stem>.+)\.manifest-(?P<version>\d{6})\.json$")
_OBJECTS = re.compile(r"^(?P<stem>.+)\.objects-[0-9a-f]{32}/$")
_TRIES = 5  # create-only races lost in a row before giving up (one writer per name: none expected)


def is_object_store(storage: RunStorage) -> bool:
    return bool(getattr(storage, "object_store", False))


def _split(rel: str) -> tuple[str, str]:
    folder, _, stem = rel.rpartition("/")
    return folder, stem


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _manifests(storage: RunStorage, rel: str) -> list[tuple[int, str]]:
    """(version, name) of ``rel``'s manifests, newest first."""
    folder, stem = _split(rel)
    found = []
    for name in storage.list(folder):
        m = _MANIFEST.match(name)
        if m and m["stem"] == stem:
            found.append((int(m["version"]), _join(folder, name)))
    return sorted(found, reverse=True)


def _read(storage: RunStorage, name: str) -> dict | None:
    try:
        body = json.loads(storage.read(name).decode())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    ok = (
        isinstance(body, dict) and isinstance(body.get("prefix"), str) and isinstance(body.get("files"), list)
    )
    return body if ok else None


def resolve(storage: RunStorage, rel: str) -> str | None:
    """The prefix holding ``rel``'s committed files: the newest manifest whose files all exist."""
    for _, name in _manifests(storage, rel):
        body = _read(storage, name)
        if body and all(storage.exists(f"{body['prefix']}/{f}") for f in body["files"]):
            return body["prefix"]
    return None


def write_versioned(storage: RunStorage, rel: str, write: Callable[[str], list[str]], **meta) -> str:
    """Commit a new version of the folder ``rel``: ``write(prefix)`` uploads its files under ``prefix``
    and returns their names; then the manifest (``meta`` goes into it). Returns the prefix."""
    folder, stem = _split(rel)
    prefix = _join(folder, f"{stem}.objects-{uuid.uuid4().hex}")
    files = write(prefix)
    body = {"prefix": prefix, "files": sorted(files), **meta}
    data = (json.dumps(body, indent=2) + "\n").encode()
    for _ in range(_TRIES):
        newest = _manifests(storage, rel)
        version = (newest[0][0] if newest else 0) + 1
        try:
            storage.write(_join(folder, f"{stem}.manifest-{version:06d}.json"), data, create_only=True)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{storage.describe(rel)}: could not commit a new version")
    _collect(storage, rel, keep=prefix)
    return prefix


def _collect(storage: RunStorage, rel: str, keep: str | None) -> None:
    """``rel``'s manifests other than the one naming ``keep``, then its objects no manifest names."""
    named = set()
    for _, name in _manifests(storage, rel):
        body = _read(storage, name)
        if keep is not None and body and body["prefix"] == keep:
            named.add(keep)
            continue
        storage.delete(name)  # older commits first: a crash here leaves the newer one readable
    folder, stem = _split(rel)
    for name in storage.list(folder):
        m = _OBJECTS.match(name)
        if m and m["stem"] == stem and _join(folder, name.rstrip("/")) not in named:
            storage.delete(_join(folder, name.rstrip("/")))


def delete(storage: RunStorage, rel: str) -> None:
    """Every version of ``rel``: manifests first, then the objects."""
    _collect(storage, rel, keep=None)


def committed(storage: RunStorage, folder: str) -> list[str]:
    """The names (``folder/stem``) that have at least one manifest in ``folder``, sorted."""
    stems = {m["stem"] for m in map(_MANIFEST.match, storage.list(folder)) if m}
    return sorted(_join(folder, s) for s in stems)
