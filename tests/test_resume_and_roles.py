"""Resume after a crash equals the uninterrupted run; separate coordinator/worker commands train to
the same model as ``lepton train``. Real processes throughout."""

import json
import os
import re
import signal

import pytest
import yaml

import lepton
from conftest import job_dict, max_rel_diff, run_cli, weights
from conftest import wait_for as _wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import make_classification_csv

    root = tmp_path_factory.mktemp("ref")
    data = make_classification_csv(root / "data.csv", rows=400)
    job = job_dict(data, train__epochs=4, checkpoint__every_steps=5)
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    res = lepton.train(job, workers=2, run_dir=root / "ref")
    assert res.status == "completed", res.reason
    return root, res


def test_resume_after_kill_equals_uninterrupted(reference, procs, tmp_path):
    root, ref = reference
    run_dir = tmp_path / "run"
    # every step slowed down so the kill lands mid-run; the slowdown does not change the math
    p = procs.lepton(
        "train",
        root / "job.yaml",
        "--workers",
        2,
        "--run-dir",
        run_dir,
        "--no-progress",
        env={"LEPTON_FAULTS": "slow:rank=*:seconds=0.05"},
    )
    state = run_dir / "state.json"

    def checkpointed():
        try:
            ck = json.loads(state.read_text()).get("latest_checkpoint")
        except (OSError, json.JSONDecodeError):
            return False
        return bool(ck) and ck["step"] >= 10

    _wait_for(checkpointed, 120, "a checkpoint at step >= 10")
    os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers die at once
    p.wait(timeout=10)
    st = json.loads(state.read_text())
    assert st["status"] == "running" and st["step"] < st["total_steps"], st

    r = run_cli("train", "--resume", "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 0, r.stderr
    events = [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines()]
    restarts = [e for e in events if e["kind"] == "generation"]
    assert restarts[-1]["start_step"] >= 10
    diff = max_rel_diff(weights(run_dir), weights(ref.run_dir))
    assert diff <= 1e-4, f"resumed run differs from the uninterrupted one by {diff:.2e}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["accuracy"] == pytest.approx(ref.summary["test"]["accuracy"], abs=1e-9)


def test_resume_of_completed_run_is_refused(reference):
    _, ref = reference
    r = run_cli("train", "--resume", "--run-dir", ref.run_dir, "--no-progress")
    assert r.returncode == 2 and "already completed" in r.stderr and "Traceback" not in r.stderr


def test_separate_coordinator_and_workers(reference, procs, tmp_path):
    root, ref = reference
    run_dir = tmp_path / "sep"
    coord = procs.lepton(
        "coordinator", root / "job.yaml", "--bind", "127.0.0.1:0", "--run-dir", run_dir, "--workers", 2
    )
    url = None
    for _ in range(3):
        line = coord.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
        if "token file:" in line:
            assert line.split("token file:")[1].strip() == str(run_dir / "token")
    assert url, "the coordinator did not print its URL"
    assert oct((run_dir / "token").stat().st_mode & 0o777) == "0o600"
    workers = [
        procs.lepton("worker", "--coordinator", url, "--token-file", run_dir / "token") for _ in range(2)
    ]
    assert coord.wait(timeout=120) == 0, coord.stderr.read()
    for w in workers:
        assert w.wait(timeout=30) == 0, w.stderr.read()
    diff = max_rel_diff(weights(run_dir), weights(ref.run_dir))
    assert diff <= 1e-4, f"separate roles differ from lepton train by {diff:.2e}"


def test_workers_that_reach_the_run_only_through_the_coordinator(reference, procs, tmp_path):
    """``--run-files coordinator``: the prepared data comes down, checkpoints and the model go up
    through the file API (tests/test_multihost.py does it from hosts that cannot see the folder)."""
    root, ref = reference
    run_dir = tmp_path / "api"
    coord = procs.lepton("coordinator", root / "job.yaml", "--run-dir", run_dir, "--workers", 2)
    url = re.search(r"(http://\S+)", coord.stdout.readline()).group(1)
    env = {"LEPTON_TOKEN": (run_dir / "token").read_text().strip(), "LEPTON_CACHE_DIR": str(tmp_path / "c")}
    workers = [
        procs.lepton("worker", "--coordinator", url, "--run-files", "coordinator", env=env) for _ in range(2)
    ]
    assert coord.wait(timeout=120) == 0, coord.stderr.read()
    for w in workers:
        assert w.wait(timeout=30) == 0, w.stderr.read()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert list((tmp_path / "c" / "blobs").rglob("*"))  # the data came from the cache, not the folder
    diff = max_rel_diff(weights(run_dir), weights(ref.run_dir))
    assert diff <= 1e-4, f"workers over the file API differ from lepton train by {diff:.2e}"


def test_worker_token_from_environment(reference, procs, tmp_path):
    root, _ = reference
    run_dir = tmp_path / "env"
    coord = procs.lepton(
        "coordinator", root / "job.yaml", "--run-dir", run_dir, "--workers", 1, "--set", "train.epochs=1"
    )
    url = re.search(r"(http://\S+)", coord.stdout.readline()).group(1)
    token = (run_dir / "token").read_text().strip()
    w = procs.lepton("worker", "--coordinator", url, env={"LEPTON_TOKEN": token})
    assert w.wait(timeout=60) == 0, w.stderr.read()
    assert coord.wait(timeout=60) == 0
    assert json.loads((run_dir / "summary.json").read_text())["workers"] == 1
