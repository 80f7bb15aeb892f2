"""The storage seam against a real S3-compatible server: moto's standalone server (``moto_server``) on
loopback, a separate process, reached through s3fs over HTTP as any S3 endpoint is. What is tested here
is the storage layer (``FsspecStorage`` on ``s3://``, the manifest commits of storage/manifest.py); the
commands do not take ``--run-dir s3://`` yet."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fakes import Crashing
from lepton.storage.backend import FsspecStorage
from lepton.storage.rundir import RunDir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

pytest.importorskip("s3fs")
CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint():
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert server, "moto[server] is in the test extras: `make test` installs it"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise AssertionError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        p.kill()
        p.wait(timeout=10)


@pytest.fixture
def s3_run(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # moto's default; no location constraint
    bucket = f"lepton-{uuid.uuid4().hex[:12]}"
    opts = {**CREDENTIALS, "client_kwargs": {"endpoint_url": s3_endpoint}}
    storage = FsspecStorage(f"s3://{bucket}/run", **opts)
    storage.fs.mkdir(bucket)
    return RunDir(storage)


def test_s3_storage_reads_what_it_wrote(s3_run, tmp_path):
    st = s3_run.storage
    assert st.object_store and st.list("") == []
    st.write("state.json", b'{"step": 1}\n')
    st.write("data/train_x.npy", b"\x93NUMPY")
    assert st.read("state.json") == b'{"step": 1}\n' and st.exists("data/train_x.npy")
    assert st.list("") == ["data/", "state.json"] and st.list("data") == ["train_x.npy"]
    with pytest.raises(FileExistsError):  # a conditional put: the store refuses, no check-then-write
        st.write("state.json", b"again", create_only=True)
    assert st.read("state.json") == b'{"step": 1}\n'
    local = st.local_path("data/train_x.npy")
    assert local.read_bytes() == b"\x93NUMPY"
    st.delete("data")
    assert st.list("") == ["state.json"]


def test_s3_checkpoints_commit_by_manifest_and_survive_a_writer_killed_anywhere(s3_run):
    """A checkpoint writer killed at each of its uploads and deletes in turn: every resume finds a
    complete checkpoint (the previous one or the new one), and rotation keeps ``keep`` of them."""
    import torch

    from lepton.storage import manifest
    from lepton.storage.checkpoint import read_checkpoint, write_checkpoint

    run = s3_run
    write_checkpoint(run, 10, {"w": torch.zeros(3)}, keep=2)
    value = {10: 0.0}  # what each committed step holds
    outcomes = set()
    for after in range(1, 9):  # its 1st, 2nd ... write, upload or delete raises
        step = 10 + 10 * after
        try:
            write_checkpoint(
                RunDir(Crashing(run.storage, after)), step, {"w": torch.full((3,), float(step))}, 2
            )
            outcomes.add("completed")
        except SystemExit:
            outcomes.add("killed")
        committed = manifest.committed(run.storage, "checkpoints")
        newest = int(committed[-1].rpartition("-")[2])
        # killed before its manifest: the previous newest; at or after it: this one
        assert newest in (step, max(value)), (after, committed)
        value[newest] = float(newest) if newest == step else value[newest]
        for rel in committed:  # no manifest names a missing object
            assert manifest.resolve(run.storage, rel) is not None, rel
        got = read_checkpoint(committed[-1], storage=run.storage)["w"]
        assert torch.equal(got, torch.full((3,), value[newest])), (after, newest, got)
    assert outcomes == {"completed", "killed"}
    write_checkpoint(run, 1000, {"w": torch.ones(3)}, keep=2)
    assert len(manifest.committed(run.storage, "checkpoints")) == 2
    names = run.storage.list("checkpoints")
    assert sum(".manifest-" in n for n in names) == 2, names


def test_train_reads_its_data_from_s3(s3_endpoint, tmp_path):
    """``data.path: s3://...`` read by `lepton train` through s3fs, the endpoint and credentials from the
    usual AWS variables: the same model as from the local copy of the file."""
    import s3fs
    import yaml

    from conftest import job_dict, make_classification_csv, max_rel_diff, run_cli, weights

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})
    bucket = f"lepton-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.put_file(str(data), f"{bucket}/in/data.csv")
    runs = {}
    for name, path in (("local", str(data)), ("s3", f"s3://{bucket}/in/data.csv")):
        job = tmp_path / f"{name}.yaml"
        job.write_text(yaml.safe_dump(job_dict(path, train__epochs=1, cluster__shares=[0.5, 0.5])))
        r = run_cli("train", job, "--run-dir", tmp_path / name, "--no-progress", timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        runs[name] = tmp_path / name
    assert max_rel_diff(weights(runs["s3"]), weights(runs["local"])) == 0.0  # fixed shares: bitwise
