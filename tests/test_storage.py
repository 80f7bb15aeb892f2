"""The storage seam (lepton/storage/backend.py): one protocol, a local and an fsspec implementation, the
same tests for both."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from lepton.storage.backend import FsspecStorage, LocalStorage, RunStorage


@pytest.fixture(params=["local", "fsspec-memory", "fsspec-file"])
def storage(request, tmp_path):
    if request.param == "local":
        yield LocalStorage(tmp_path / "run")
    elif request.param == "fsspec-memory":
        s = FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
        yield s
        if s.fs.exists(s.base):                             # the memory filesystem is process-wide
            s.fs.rm(s.base, recursive=True)
    else:
        yield FsspecStorage(f"file://{tmp_path / 'run'}", cache_dir=tmp_path / "cache")


# --- the protocol, for every implementation ---------------------------------------------------------
def test_a_storage_implements_the_protocol(storage):
    assert isinstance(storage, RunStorage)


def test_a_written_file_reads_back_and_a_second_write_replaces_it(storage):
    storage.write("a/b/c.json", b"one")                    # the folders above it are created
    assert storage.read("a/b/c.json") == b"one"
    storage.write("a/b/c.json", b"two")
    assert storage.read("a/b/c.json") == b"two"
    with storage.open_read("a/b/c.json") as f:
        assert f.read() == b"two"
    assert storage.exists("a/b/c.json") and storage.exists("a/b") and not storage.exists("a/x")


def test_a_write_leaves_no_temporary_file(storage):
    storage.write("f", b"x")
    with storage.open_write("g") as f:
        f.write(b"y")
    assert storage.list() == ["f", "g"]


def test_a_streamed_write_that_raises_leaves_the_old_file(storage):
    storage.write("state.pt", b"old")
    with pytest.raises(RuntimeError), storage.open_write("state.pt") as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert storage.read("state.pt") == b"old"
    assert storage.list() == ["state.pt"]


def test_a_create_only_write_refuses_an_existing_file(storage):
    storage.write("checkpoints/manifest-1.json", b"first", create_only=True)
    with pytest.raises(FileExistsError):
        storage.write("checkpoints/manifest-1.json", b"second", create_only=True)
    assert storage.read("checkpoints/manifest-1.json") == b"first"
    assert storage.list("checkpoints") == ["manifest-1.json"]


def test_reading_a_missing_file_raises_file_not_found(storage):
    for read in (storage.read, storage.open_read, storage.local_path):
        with pytest.raises(FileNotFoundError):
            read("nothing.json")
    assert not storage.exists("nothing.json")


def test_list_names_files_and_folders_with_a_slash(storage):
    storage.write("checkpoints/step-000000002/state.pt", b"s")
    storage.write("checkpoints/step-000000001/state.pt", b"s")
    storage.write("checkpoints/notes.txt", b"n")
    assert storage.list("checkpoints") == ["notes.txt", "step-000000001/", "step-000000002/"]
    assert storage.list("checkpoints/step-000000001") == ["state.pt"]
    assert storage.list("no-such-folder") == []
    assert storage.list() == ["checkpoints/"]


def test_delete_removes_a_file_or_a_tree_and_ignores_a_missing_one(storage):
    storage.write("t/a/1", b"1")
    storage.write("t/a/2", b"2")
    storage.write("t/f", b"f")
    storage.delete("t/f")
    assert not storage.exists("t/f")
    storage.delete("t/a")
    assert not storage.exists("t/a") and not storage.exists("t/a/1")
    storage.delete("t/a")                                   # gone already: nothing to do
    storage.delete("never-was")


def test_append_adds_lines_and_creates_the_file(storage):
    storage.append("logs/events.jsonl", b'{"a": 1}\n')
    storage.append("logs/events.jsonl", b'{"a": 2}\n')
    with storage.open_append("logs/events.jsonl") as f:
        f.write(b'{"a": 3}\n')
    assert storage.read("logs/events.jsonl") == b'{"a": 1}\n{"a": 2}\n{"a": 3}\n'


def test_move_renames_a_file_and_a_folder(storage):
    storage.write(".step.tmp/state.pt", b"s")
    storage.write(".step.tmp/meta.json", b"m")
    storage.move(".step.tmp", "step")
    assert storage.list("step") == ["meta.json", "state.pt"] and not storage.exists(".step.tmp")
    storage.move("step/meta.json", "meta.json")
    assert storage.read("meta.json") == b"m"


def test_put_copies_a_local_file(storage, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"w" * 1000)
    for link in (False, True):
        storage.put(src, f"data/w{int(link)}.bin", link=link)
        assert storage.read(f"data/w{int(link)}.bin") == b"w" * 1000


def test_local_path_is_a_file_that_can_be_memory_mapped(storage):
    a = np.arange(10, dtype=np.float32)
    with storage.open_write("data/train_x.npy") as f:
        np.save(f, a)
    path = storage.local_path("data/train_x.npy")
    assert np.array_equal(np.load(path, mmap_mode="r"), a)
    b = a * 2                                              # replaced: the path gives the new content
    with storage.open_write("data/train_x.npy") as f:
        np.save(f, b)
    assert np.array_equal(np.load(storage.local_path("data/train_x.npy"), mmap_mode="r"), b)


def test_names_that_leave_the_root_are_refused(storage):
    for bad in ("../x", "/etc/passwd", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            storage.write(bad, b"x")


def test_local_storage_answers_with_its_own_files(tmp_path):
    s = LocalStorage(tmp_path)
    s.write("x/y", b"1")
    assert s.local_path("x/y") == tmp_path / "x" / "y" and s.describe("x/y") == str(tmp_path / "x" / "y")
    s.write("token", b"t", mode=0o600)
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600


def test_fsspec_storage_writes_one_upload_on_an_object_store():
    assert FsspecStorage("memory://x").object_store is False
    assert FsspecStorage("memory://x", object_store=True).object_store is True
    s = FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}", object_store=True)
    s.write("a/b.json", b"1")                               # a single put: no temporary object, no move
    s.write("a/b.json", b"2")
    assert s.read("a/b.json") == b"2" and s.list("a") == ["b.json"]
    with pytest.raises(RuntimeError), s.open_write("a/b.json") as f:
        f.write(b"partial")
        raise RuntimeError("crash mid-upload")
    assert s.read("a/b.json") == b"2"


# --- invariant 4: an interrupted atomic write leaves the old file -----------------------------------
def test_an_fsspec_write_whose_move_fails_leaves_the_old_file(tmp_path, monkeypatch):
    s = FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}")
    s.write("state.json", b"old")

    def crash(*a, **k):
        raise OSError("simulated crash at the move")
    monkeypatch.setattr(s.fs, "mv", crash)
    with pytest.raises(OSError, match="simulated crash"):
        s.write("state.json", b"new")
    assert s.read("state.json") == b"old" and s.list() == ["state.json"]
