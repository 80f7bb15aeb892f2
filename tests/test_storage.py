"""The storage seam (lepton/storage/backend.py): one protocol, a local and an fsspec implementation, the
same tests for both; RunDir over it writes the run directory it always wrote (design.md §4)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from fakes import Crashing
from lepton.storage import backend, segments
from lepton.storage.backend import FsspecStorage, LocalStorage, RunStorage
from lepton.storage.rundir import RunDir, read_jsonl


@pytest.fixture(params=["local", "fsspec-memory", "fsspec-file"])
def storage(request, tmp_path):
    if request.param == "local":
        yield LocalStorage(tmp_path / "run")
    elif request.param == "fsspec-memory":
        s = FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
        yield s
        if s.fs.exists(s.base):  # the memory filesystem is process-wide
            s.fs.rm(s.base, recursive=True)
    else:
        yield FsspecStorage(f"file://{tmp_path / 'run'}", cache_dir=tmp_path / "cache")


# --- the protocol, for every implementation ---------------------------------------------------------
def test_a_storage_implements_the_protocol(storage):
    assert isinstance(storage, RunStorage)


def test_a_written_file_reads_back_and_a_second_write_replaces_it(storage):
    storage.write("a/b/c.json", b"one")  # the folders above it are created
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
    storage.delete("t/a")  # gone already: nothing to do
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
    b = a * 2  # replaced: the path gives the new content
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
    s.write("a/b.json", b"1")  # a single put: no temporary object, no move
    s.write("a/b.json", b"2")
    assert s.read("a/b.json") == b"2" and s.list("a") == ["b.json"]
    with pytest.raises(RuntimeError), s.open_write("a/b.json") as f:
        f.write(b"partial")
        raise RuntimeError("crash mid-upload")
    assert s.read("a/b.json") == b"2"


# --- invariant 4: an interrupted atomic write leaves the old file -----------------------------------
def test_a_write_whose_rename_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.write_state({"status": "running", "step": 1})
    before = run.state_json.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash at the rename")

    monkeypatch.setattr(backend.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        run.write_state({"status": "running", "step": 2})
    assert run.state_json.read_bytes() == before
    assert sorted(p.name for p in run.root.iterdir()) == ["state.json"]


def test_an_fsspec_write_whose_move_fails_leaves_the_old_file(tmp_path, monkeypatch):
    s = FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}")
    s.write("state.json", b"old")

    def crash(*a, **k):
        raise OSError("simulated crash at the move")

    monkeypatch.setattr(s.fs, "mv", crash)
    with pytest.raises(OSError, match="simulated crash"):
        s.write("state.json", b"new")
    assert s.read("state.json") == b"old" and s.list() == ["state.json"]


def test_a_checkpoint_whose_rename_fails_leaves_the_last_good_one(tmp_path, monkeypatch):
    import torch

    from lepton.storage.checkpoint import read_checkpoint, write_checkpoint

    run = RunDir(tmp_path / "run")
    path = write_checkpoint(run, 5, {"w": torch.ones(2)}, keep=2)
    monkeypatch.setattr(LocalStorage, "move", lambda self, a, b: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        write_checkpoint(run, 5, {"w": torch.zeros(2)}, keep=2)
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2))


# --- RunDir over the seam -------------------------------------------------------------------------
def _write_a_run(run: RunDir, extra: Path) -> None:
    """Every kind of file a run has, written through RunDir and the modules that name files in it."""
    import torch

    from lepton.storage.checkpoint import write_best, write_checkpoint, write_model
    from lepton.storage.prepared import PreparedData

    run.write_job({"name": "j", "seed": 3, "model": {"layers": [4, 4]}})
    run.write_state({"status": "running", "step": np.int64(7), "path": Path("/x")})
    run.append_event({"kind": "start", "time": 1.5})
    run.append_event({"kind": "é", "v": np.float32(0.5)})
    run.append_metric({"kind": "train", "step": 1})
    run.write_summary({"status": "completed", "steps": 3})
    run.create_token("tok-abc")
    torch.manual_seed(0)
    sd = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    for s in (10, 20, 30, 30):
        write_checkpoint(run, s, {"model": sd, "step": s}, keep=2)
    write_best(run, 20, {"model": sd, "step": 20})
    extra.write_bytes(b"factory")
    write_model(
        "model",
        sd,
        {"format": "lepton-model/1", "v": np.int64(2)},
        {"model_factory.pkl": extra},
        storage=run.storage,
    )

    class Pre:
        def to_dict(self):
            return {"kind": "fake", "n": 2}

    x, y = np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6, dtype=np.int64).reshape(6, 1) * 2
    arrays = {f"{s}_{p}": x if p == "x" else y for s in ("train", "val", "test") for p in "xy"}
    PreparedData(arrays, Pre(), {"rows": 6}).write(run, "fp123")


# the files and their contents as the run directory held them before the seam (sha256, first 16 hex)
BEFORE = {
    "checkpoints/best/meta.json": "6757ee3248e9833d",
    "checkpoints/best/state.pt": "ac23dd44dbf1ab91",
    "checkpoints/step-000000020/meta.json": "6757ee3248e9833d",
    "checkpoints/step-000000020/state.pt": "ac23dd44dbf1ab91",
    "checkpoints/step-000000030/meta.json": "9b0f80bd23b82cfa",
    "checkpoints/step-000000030/state.pt": "e9a0e405fd597ee8",
    "data/manifest.json": "49d38d2b173a84b0",
    "data/preprocess.json": "5ffa9ab438625163",
    "data/test_x.npy": "3bc7c1aac7f792ef",
    "data/test_y.npy": "4e7e96bb6e3b65f0",
    "data/train_x.npy": "3bc7c1aac7f792ef",
    "data/train_y.npy": "4e7e96bb6e3b65f0",
    "data/val_x.npy": "3bc7c1aac7f792ef",
    "data/val_y.npy": "4e7e96bb6e3b65f0",
    "events.jsonl": "e2f0c5cc52a785af",
    "job.yaml": "19c73fac43e83d77",
    "metrics.jsonl": "70703d479ea4ca16",
    "model/lepton.json": "8526c5be643e80e8",
    "model/model_factory.pkl": "06c8aaa93d80a768",
    "model/weights.safetensors": "ae8da253aaa418d0",
    "state.json": "f1a9263e8f59570c",
    "summary.json": "8dbeb4afd6dddef1",
    "token": "4580ce52daa0b310",
}


def _tree(storage: RunStorage, rel: str = "") -> dict[str, str]:
    out = {}
    for name in storage.list(rel):
        r = f"{rel}/{name}" if rel else name
        if name.endswith("/"):
            out.update(_tree(storage, r.rstrip("/")))
        else:
            out[r] = hashlib.sha256(storage.read(r)).hexdigest()[:16]
    return out


def test_run_dir_over_local_storage_writes_the_files_it_wrote_before(tmp_path):
    run = RunDir(tmp_path / "run")
    _write_a_run(run, tmp_path / "factory.pkl")
    assert _tree(run.storage) == BEFORE
    assert sorted(str(p.relative_to(run.root)) for p in run.root.rglob("*") if p.is_file()) == sorted(BEFORE)
    modes = {
        str(p.relative_to(run.root)): p.stat().st_mode & 0o777 for p in run.root.rglob("*") if p.is_file()
    }
    default = 0o666 & ~backend._umask()
    assert modes == {k: 0o600 if k in ("token", "model/weights.safetensors") else default for k in BEFORE}
    assert json.loads(run.state_json.read_text()) == {"status": "running", "step": 7, "path": "/x"}
    assert run.state_json.read_text().startswith('{\n  "status"') and run.state_json.read_text().endswith(
        "}\n"
    )
    assert [r["kind"] for r in read_jsonl(run.events_jsonl)] == ["start", "é"]


def test_run_dir_over_fsspec_writes_the_same_files(tmp_path):
    run = RunDir(FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache"))
    _write_a_run(run, tmp_path / "factory.pkl")
    assert _tree(run.storage) == BEFORE


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_run_dir_reads_back_what_it_wrote(tmp_path, kind, monkeypatch):
    import torch

    from lepton.storage.checkpoint import (
        read_checkpoint,
        read_model,
        readable_state_dir,
        write_checkpoint,
    )
    from lepton.storage.prepared import DataCache
    from lepton.storage.preprocess import Preprocessor

    storage = (
        LocalStorage(tmp_path / "run")
        if kind == "local"
        else FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")
    )
    run = RunDir(storage)
    assert not run.holds_run() and run.read_state() == {}
    _write_a_run(run, tmp_path / "factory.pkl")
    assert run.holds_run()
    assert run.read_state() == {"status": "running", "step": 7, "path": "/x"}
    assert run.read_job_dict()["model"] == {"layers": [4, 4]}
    assert run.create_token() == "tok-abc"  # the existing token on resume
    assert [e["kind"] for e in run.events()] == ["start", "é"] and [m["step"] for m in run.metrics()] == [1]
    ck = write_checkpoint(run, 40, {"w": torch.ones(2)}, keep=2)
    assert ck == run.locate("checkpoints/step-000000040")
    assert torch.equal(read_checkpoint("checkpoints/step-000000040", storage=storage)["w"], torch.ones(2))
    assert readable_state_dir("checkpoints/step-000000040", storage=storage) == "checkpoints/step-000000040"
    assert readable_state_dir("checkpoints/step-000000001", storage=storage) is None
    weights, meta = read_model("model", storage=storage)
    assert meta["v"] == 2 and set(weights) == {"w", "b"}
    monkeypatch.setattr(Preprocessor, "from_dict", classmethod(lambda cls, d: d))  # _write_a_run's is a fake
    cache = DataCache(run)
    x, y = cache.get("train")
    assert cache.preprocessor == {"kind": "fake", "n": 2}
    assert x.shape == (6, 2) and y.shape == (6, 1) and isinstance(x, np.memmap)


def test_a_torn_last_line_is_skipped(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_event({"kind": "a"})
    with open(run.events_jsonl, "ab") as f:
        f.write(b'{"kind": "b", "det')  # a crash mid-append
    assert [e["kind"] for e in run.events()] == ["a"]
    assert [e["kind"] for e in read_jsonl(run.events_jsonl)] == ["a"]


def test_append_jsonl_takes_a_run_path_or_a_name(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_jsonl(run.metrics_jsonl, {"step": 1})
    run.append_jsonl("metrics.jsonl", {"step": 2})
    assert run.metrics_jsonl.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_the_methods_for_the_launcher_write_where_the_paths_say(tmp_path):
    run = RunDir(tmp_path / "run")
    src = tmp_path / "init.safetensors"
    src.write_bytes(b"weights")
    assert run.copy_init_weights(src) == run.init_weights and run.init_weights.read_bytes() == b"weights"
    run.copy_in(src, "data/x.npy", link=True)
    assert os.path.samefile(src, run.data_dir / "x.npy")  # a hard link on one file system
    run.write_factory(b"pickle")
    assert run.factory_pickle.read_bytes() == b"pickle" and run.read_factory() == b"pickle"
    assert run.read_data_from() is None
    run.write_data_from("/runs/source")
    assert run.data_from_file.read_text() == "/runs/source" and run.read_data_from() == "/runs/source"
    with run.worker_log(2) as f:
        f.write(b"line 1\n")
    with run.worker_log(2) as f:
        f.write(b"line 2\n")
    assert (run.logs_dir / "worker-2.log").read_bytes() == b"line 1\nline 2\n"


def test_share_prepared_links_the_files_and_writes_the_manifest_last(tmp_path):
    from lepton.storage.prepared import share_prepared

    source = RunDir(tmp_path / "a")
    for name in ("train_x.npy", "preprocess.json", "manifest.json"):
        source.storage.write(f"data/{name}", name.encode())
    run = RunDir(tmp_path / "b")
    share_prepared(source, run)
    assert sorted(p.name for p in run.data_dir.iterdir()) == [
        "manifest.json",
        "preprocess.json",
        "train_x.npy",
    ]
    assert os.path.samefile(run.data_dir / "train_x.npy", source.data_dir / "train_x.npy")


def test_a_run_dir_not_on_this_machine_has_no_local_paths():
    from lepton.errors import LeptonError

    run = RunDir(FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}"))
    with pytest.raises(LeptonError, match="not a folder on this machine"):
        _ = run.state_json
    assert run.where("state.json").startswith("memory://") and run.where("state.json").endswith("/state.json")


# --- commits by manifest on an object store (storage/manifest.py) -----------------------------------


def _object_store_run():
    return RunDir(FsspecStorage(f"memory://lepton-test-{uuid.uuid4().hex}", object_store=True))


def test_object_store_checkpoints_commit_by_manifest_and_rotate():
    import torch

    from lepton.storage import manifest
    from lepton.storage.checkpoint import read_checkpoint, readable_state_dir, write_checkpoint

    run = _object_store_run()
    for step in (10, 20, 30):
        write_checkpoint(run, step, {"w": torch.full((3,), float(step))}, keep=2)
    st = run.storage
    assert manifest.committed(st, "checkpoints") == [
        "checkpoints/step-000000020",
        "checkpoints/step-000000030",
    ]
    names = st.list("checkpoints")
    assert not any(n.startswith("step-000000010") for n in names), names  # manifest and objects gone
    assert sum(".objects-" in n for n in names) == 2 and sum(".manifest-" in n for n in names) == 2
    assert float(read_checkpoint("checkpoints/step-000000030", storage=st)["w"][0]) == 30.0
    assert readable_state_dir("checkpoints/step-000000010", storage=st) is None
    # a manifest that names objects which are not there (never uploaded) is skipped
    st.write(
        "checkpoints/step-000000030.manifest-000009.json", b'{"prefix": "nowhere", "files": ["state.pt"]}'
    )
    assert float(read_checkpoint("checkpoints/step-000000030", storage=st)["w"][0]) == 30.0


def test_a_checkpoint_writer_killed_anywhere_leaves_the_old_or_the_new_one():
    """Killed at every write, move or delete of a commit in turn: a reader finds a complete checkpoint,
    the previous one or the new one, never a manifest naming missing objects; the next commit of the
    same name cleans up what the killed one left."""
    import torch

    from lepton.storage import manifest
    from lepton.storage.checkpoint import read_checkpoint, write_best

    run = _object_store_run()
    write_best(run, 5, {"w": torch.zeros(4)})
    outcomes = set()
    for after in range(1, 12):
        crashing = RunDir(Crashing(run.storage, after))
        new = torch.full((4,), float(after))
        try:
            write_best(crashing, 100 + after, {"w": new})
            outcome = "committed"
        except SystemExit:
            outcome = "killed"
        outcomes.add(outcome)
        got = read_checkpoint(run.best_rel, storage=run.storage)["w"]
        assert torch.equal(got, new) or (outcome == "killed" and torch.equal(got, torch.zeros(4))), (
            after,
            got,
        )
        prefix = manifest.resolve(run.storage, run.best_rel)
        assert prefix and all(run.storage.exists(f"{prefix}/{f}") for f in ("state.pt", "meta.json"))
        write_best(run, 5, {"w": torch.zeros(4)})  # a clean commit collects the leftovers
        names = run.storage.list("checkpoints")
        assert sum(".objects-" in n for n in names) == 1 and sum(".manifest-" in n for n in names) == 1, names
    assert outcomes == {"committed", "killed"}


def test_the_model_commits_by_manifest_on_an_object_store():
    import torch

    from lepton.storage.checkpoint import read_model, write_model

    run = _object_store_run()
    for v in (1, 2):
        write_model("model", {"w": torch.full((2,), float(v))}, {"v": v}, storage=run.storage)
    weights, meta = read_model("model", storage=run.storage)
    assert meta["v"] == 2 and float(weights["w"][0]) == 2.0
    assert sum(".objects-" in n for n in run.storage.list("")) == 1


# --- appends on an object store: segments (backend.py) ----------------------------------------------
def test_appends_on_an_object_store_go_into_segments_that_read_as_one_file(monkeypatch):
    monkeypatch.setattr(backend, "SEGMENT_BYTES", 20)  # as backend.py imported it
    url = f"memory://lepton-test-{uuid.uuid4().hex}"
    s = FsspecStorage(url, object_store=True)
    s.write("state.json", b"{}")
    for i in range(5):
        s.append("events.jsonl", f'{{"i": {i}}}\n'.encode())  # 9 bytes: two to a segment
    s.flush()
    parts = s.fs.ls(f"{s.base}/events.jsonl{segments.PARTS}")
    assert len(parts) == 3  # each object was uploaded whole: no append on the store
    assert s.read("events.jsonl") == b"".join(f'{{"i": {i}}}\n'.encode() for i in range(5))
    assert s.exists("events.jsonl") and s.list() == ["events.jsonl", "state.json"]
    assert [r["i"] for r in RunDir(s).events()] == [0, 1, 2, 3, 4]
    # another process (a coordinator restarted elsewhere) appends after them, never over them
    again = FsspecStorage(url, object_store=True)
    again.append("events.jsonl", b'{"i": 5}\n')
    again.flush()
    assert [r["i"] for r in RunDir(FsspecStorage(url, object_store=True)).events()] == [0, 1, 2, 3, 4, 5]
    with again.open_append("logs/worker-0.log") as f:  # a log pumped line by line
        f.write(b"one\n")
        f.writelines([b"two\n", b"three\n"])
    assert s.read("logs/worker-0.log") == b"one\ntwo\nthree\n"
    again.delete("events.jsonl")
    assert not again.exists("events.jsonl") and again.list() == ["logs/", "state.json"]


def test_an_appended_line_is_uploaded_in_the_background_within_the_flush_interval(monkeypatch):
    import time

    monkeypatch.setattr(segments, "APPEND_FLUSH_S", 0.05)
    url = f"memory://lepton-test-{uuid.uuid4().hex}"
    s = FsspecStorage(url, object_store=True)
    s.append("metrics.jsonl", b'{"step": 1}\n')
    reader = FsspecStorage(url, object_store=True)
    deadline = time.monotonic() + 10
    while not reader.exists("metrics.jsonl"):  # no flush() called: the flusher thread uploads it
        assert time.monotonic() < deadline, "the appended line was never uploaded"
        time.sleep(0.02)
    assert reader.read("metrics.jsonl") == b'{"step": 1}\n'
    s.close()
