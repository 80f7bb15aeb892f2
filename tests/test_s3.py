"""The storage seam against a real S3-compatible server: moto's standalone server (``moto_server``) on
loopback, a separate process (s3server.py), reached through s3fs over HTTP as any S3 endpoint is: the
storage layer (``FsspecStorage`` on ``s3://``, the manifest commits of storage/manifest.py) and the
commands with ``--run-dir s3://...`` (train, resume, predict, export, runs, status). A coordinator that
resumes on another host from the bucket: test_multihost.py."""

from __future__ import annotations

import uuid

import pytest

from fakes import Crashing
from lepton.storage.backend import FsspecStorage
from lepton.storage.rundir import RunDir
from s3server import CREDENTIALS, S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def s3_endpoint(s3):
    return s3.url


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


def _model_of(s3: S3Server, url: str) -> dict:
    from lepton.storage.checkpoint import read_model

    return read_model("model", storage=s3.storage(url))[0]


def test_a_run_on_s3_trains_resumes_predicts_exports_and_is_listed(s3, procs, tmp_path):
    """`--run-dir s3://...` end to end, with nothing of the run on this machine's disk: a training
    SIGKILLed mid-run (launcher and workers at once) and resumed equals the uninterrupted local run;
    predict, export, runs and status take the URL as they take a folder."""
    import json
    import os
    import signal

    import numpy as np
    import yaml

    import lepton
    from conftest import job_dict, make_classification_csv, max_rel_diff, run_cli, wait_for

    data = make_classification_csv(tmp_path / "data.csv", rows=400)
    job = job_dict(data, train__epochs=4, checkpoint__every_steps=5, cluster__shares=[0.5, 0.5])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    ref = lepton.train(job, workers=2, run_dir=tmp_path / "ref")
    assert ref.status == "completed", ref.reason

    url = f"s3://{s3.bucket()}/runs/one"
    work = tmp_path / "cwd"  # the commands' working folder: nothing may be written into it
    work.mkdir()
    p = procs.lepton(
        "train",
        tmp_path / "job.yaml",
        "--workers",
        2,
        "--run-dir",
        url,
        "--no-progress",
        env={**s3.env, "LEPTON_FAULTS": "slow:rank=*:seconds=0.05"},
        cwd=work,
    )
    store = s3.storage(url)

    def checkpointed():
        try:
            ck = json.loads(store.read("state.json")).get("latest_checkpoint")
        except (OSError, ValueError):
            return False
        return bool(ck) and ck["step"] >= 10

    wait_for(checkpointed, 120, "a checkpoint at step >= 10 on S3")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    state = json.loads(store.read("state.json"))
    assert state["status"] == "running" and state["step"] < state["total_steps"], state
    assert state["latest_checkpoint"]["path"].startswith(f"{url}/checkpoints/step-")

    r = run_cli("train", "--resume", "--run-dir", url, "--no-progress", env=s3.env, cwd=work, timeout=180)
    assert r.returncode == 0, r.stderr
    assert url in r.stdout  # the summary names where the run is
    assert max_rel_diff(_model_of(s3, url), _model_of_local(ref.run_dir)) <= 1e-4
    events = [json.loads(line) for line in store.read("events.jsonl").splitlines()]
    assert [e["start_step"] for e in events if e["kind"] == "generation"][-1] >= 10
    assert store.read("logs/worker-0.log")  # the local workers' output, in appended segments

    out = tmp_path / "preds.csv"
    r = run_cli("predict", url, "--input", data, "--output", out, env=s3.env, cwd=work)
    assert r.returncode == 0, r.stderr
    r = run_cli("predict", ref.run_dir, "--input", data, "--output", tmp_path / "ref.csv", cwd=work)
    assert r.returncode == 0, r.stderr
    got, want = (
        np.genfromtxt(f, delimiter=",", skip_header=1, usecols=(1, 2)) for f in (out, tmp_path / "ref.csv")
    )
    assert np.abs(got - want).max() <= 1e-4

    r = run_cli("export", url, "--json", env=s3.env, cwd=work, timeout=180)
    assert r.returncode == 0, r.stderr
    report = json.loads(store.read("exports/report.json"))
    assert report["run_dir"] == url and report["artifacts"] == [f"{url}/exports/model.onnx"]
    assert store.exists("exports/model.onnx")

    r = run_cli("runs", url.rpartition("/")[0], "--json", env=s3.env, cwd=work)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["path"] == url and row["status"] == "completed" and row["step"] == row["total_steps"]
    r = run_cli("status", "--run-dir", url, env=s3.env, cwd=work)
    assert r.returncode == 0 and "completed" in r.stdout, (r.stdout, r.stderr)
    assert list(work.iterdir()) == []  # no local folder named s3:, nothing else


def _model_of_local(run_dir) -> dict:
    from conftest import weights

    return weights(run_dir)


def test_a_bucket_that_does_not_exist_is_one_line(s3, tmp_path):
    import yaml

    from conftest import expect_cli_error, job_dict, make_classification_csv, run_cli

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(make_classification_csv(tmp_path / "d.csv", rows=100))))
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    r = run_cli("train", job, "--run-dir", url, "--no-progress", env=s3.env, timeout=60)
    expect_cli_error(r, url)
