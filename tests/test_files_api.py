"""The coordinator's file API (coordinator/files.py) and the worker's side of it (remote.py,
``RemoteStorage``), against a real `lepton coordinator` process: what a worker may read and write, chunked
transfers checked by SHA-256, the download cache, and uploads that commit whole or not at all."""

from __future__ import annotations

import hashlib
import os

import httpx
import numpy as np
import pytest
import yaml

from conftest import coordinator_url, job_dict, make_classification_csv, wait_for
from lepton import remote
from lepton.errors import LeptonError
from lepton.remote import Fenced, RemoteStorage

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def served(procs, tmp_path):
    yield from _served(procs, tmp_path)


def _served(procs, tmp_path, **job_over):
    """A coordinator waiting for 2 workers, one fake worker registered with it over HTTP."""
    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(data, **job_over)))
    run = tmp_path / "run"
    coord = procs.lepton("coordinator", tmp_path / "job.yaml", "--run-dir", run, "--workers", 2)
    url = coordinator_url(coord)
    token = (run / "token").read_text().strip()
    reg = httpx.post(
        f"{url}/v1/register",
        json={"host": "elsewhere", "pid": 1},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()
    wid, cred = reg["worker_id"], reg["credential"]
    store = RemoteStorage(url, token, wid, cred, str(run), cache_dir=tmp_path / "cache")
    yield url, token, reg, run, store
    store.close()


def test_a_worker_reads_only_what_it_needs(served):
    url, token, reg, run, store = served
    assert yaml.safe_load(store.read("job.yaml"))["name"] == "t"
    assert store.list("data")  # the prepared splits
    for secret in ("token", "worker_key", ".lock", "state.json"):
        with pytest.raises(LeptonError, match="403"):
            store.read(secret)
    with pytest.raises(LeptonError, match="422"):
        store.read("data/../token")
    stat = f"{url}/v1/files/stat"
    auth = {"Authorization": f"Bearer {token}"}
    params = {"name": "job.yaml", "worker_id": reg["worker_id"]}
    assert httpx.get(stat, params=params, timeout=10).status_code == 401
    assert httpx.get(stat, params=params, headers=auth, timeout=10).status_code == 403  # no credential
    wrong = {**auth, "X-Lepton-Worker-Credential": "0" * 64}
    assert httpx.get(stat, params=params, headers=wrong, timeout=10).status_code == 403


def test_downloads_are_chunked_checked_and_cached(served, monkeypatch):
    _, _, _, run, store = served
    monkeypatch.setattr(remote, "CHUNK", 1000)  # many chunks for a file of a few kB
    name = "data/train_x.npy"
    got = store.local_path(name)
    assert got.read_bytes() == (run / name).read_bytes() and (run / name).stat().st_size > 3000
    assert got.name == hashlib.sha256(got.read_bytes()).hexdigest()
    np.testing.assert_array_equal(np.load(got), np.load(run / name))

    def no_download(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(store, "_download", no_download)
    assert store.local_path(name) == got  # a restarted worker on this host fetches nothing


def test_a_corrupted_download_is_refused(served, monkeypatch):
    _, _, _, _, store = served
    real = store._download

    def flip(rel, size, f, start=0):
        real(rel, size, f, start)
        f.seek(0)
        f.write(b"\xff")

    monkeypatch.setattr(store, "_download", flip)
    with pytest.raises(OSError, match="SHA-256"):
        store.local_path("data/train_y.npy")
    assert not [p for p in store.cache_dir.rglob("*") if p.is_file()]  # no blob, no partial download


def test_uploads_commit_whole_into_the_writable_folders(served, monkeypatch):
    url, token, reg, run, store = served
    monkeypatch.setattr(remote, "CHUNK", 1000)
    blob = os.urandom(2500)
    store.write("checkpoints/step-000000005/state.pt", blob)
    assert (run / "checkpoints/step-000000005/state.pt").read_bytes() == blob
    store.move("checkpoints/step-000000005", "checkpoints/step-000000006")
    assert store.list("checkpoints") == ["step-000000006/"]
    with pytest.raises(FileExistsError):
        store.write("checkpoints/step-000000006/state.pt", b"again", create_only=True)
    store.delete("checkpoints/step-000000006")
    assert not (run / "checkpoints/step-000000006").exists()
    before = (run / "job.yaml").read_bytes()
    with pytest.raises(LeptonError, match="403"):
        store.write("job.yaml", b"name: evil\n")
    assert (run / "job.yaml").read_bytes() == before
    # a commit whose hash does not match what arrived leaves nothing in the run
    h = {"Authorization": f"Bearer {token}", "X-Lepton-Worker-Credential": reg["credential"]}
    q = {"worker_id": reg["worker_id"]}
    r = httpx.put(f"{url}/v1/files/upload/abcdef0123", params={**q, "offset": 0}, content=b"abc", headers=h)
    assert r.status_code == 200, r.text
    bad = {"upload_id": "abcdef0123", "name": "model/weights.safetensors", "size": 3, "sha256": "0" * 64}
    r = httpx.post(f"{url}/v1/files/commit", params=q, json=bad, headers=h)
    assert r.status_code == 422 and not (run / "model").exists(), r.text


def test_a_worker_declared_lost_may_no_longer_write(procs, tmp_path):
    """Fencing: the fake worker never beats, so the coordinator declares it lost; its writes are then
    refused with one clear error (remote.Fenced), and nothing reaches the run."""
    served = _served(procs, tmp_path, cluster__heartbeat_timeout_s=1)
    url, token, _, run, store = next(served)

    def lost() -> bool:
        st = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        return any(w["state"] == "lost" for w in st["workers"])

    try:
        wait_for(lost, 30, "the silent worker declared lost")
        with pytest.raises(Fenced, match="not a member of this job"):
            store.write("checkpoints/step-000000001/state.pt", b"stale")
        assert not (run / "checkpoints" / "step-000000001").exists()
    finally:
        served.close()
