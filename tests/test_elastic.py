"""Elastic fault tolerance with real processes: a lost worker costs at most one step, no checkpoint is
reloaded, and the final model equals the failure-free run (design invariants 2, 3, 5)."""

import json
import os
import re
import signal
import time
from collections import defaultdict

import numpy as np
import pytest
import yaml

import lepton
from conftest import (
    coordinator_url,
    free_port,
    job_dict,
    make_classification_csv,
    max_rel_diff,
    run_cli,
    weights,
)
from conftest import wait_for as _wait_for

pytestmark = pytest.mark.timeout(300)

SLOW = "slow:rank=*:seconds=0.03"  # makes room for an outside actor; changes no math


def events(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines()]


def kinds(run_dir) -> list[str]:
    return [e["kind"] for e in events(run_dir)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    data = make_classification_csv(root / "data.csv", rows=300)
    job = job_dict(data, train__epochs=4, checkpoint__every_steps=6)
    job["cluster"].update(heartbeat_timeout_s=3, collective_timeout_s=4, wait_for_workers_s=4)
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    ref = lepton.train(job, workers=3, run_dir=root / "ref")
    assert ref.status == "completed", ref.reason
    return root, job, ref


def _check_same_model(run_dir, ref):
    diff = max_rel_diff(weights(run_dir), weights(ref.run_dir))
    assert diff <= 1e-4, f"differs from the failure-free run by {diff:.2e}"
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["test"]["accuracy"] == pytest.approx(ref.summary["test"]["accuracy"], abs=1e-9)
    return s


def _check_exactly_once(trace_prefix, n_train, batch=16):
    steps_per_epoch = int(np.ceil(n_train / batch))
    per_epoch = defaultdict(list)
    for f in trace_prefix.parent.glob(trace_prefix.name + ".*"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            per_epoch[rec["step"] // steps_per_epoch] += rec["idx"]
    assert len(per_epoch) == 4
    for epoch, idx in per_epoch.items():
        assert sorted(idx) == list(range(n_train)), f"epoch {epoch}: not every sample exactly once"


@pytest.mark.parametrize(
    "fault,transport",
    [
        ("kill:rank=1:step=0", "shm"),  # during the very first step
        ("kill:rank=2:step=13", "shm"),  # mid-epoch
        ("kill:rank=2:step=13", "gloo"),  # mid-epoch, survivors reducing over TCP
        ("kill:rank=0:step=12:at=checkpoint", "shm"),  # rank 0 while its checkpoint is being written
        ("kill:rank=1:step=14:at=eval", "shm"),  # during a validation (end of epoch 1)
    ],
)
def test_kill_one_of_three(setup, tmp_path, monkeypatch, fault, transport):
    root, job, ref = setup
    trace = tmp_path / "trace"
    monkeypatch.setenv("LEPTON_TRACE_SAMPLES", str(trace))
    monkeypatch.setenv("LEPTON_FAULTS", fault)
    res = lepton.train(
        job,
        workers=3,
        run_dir=tmp_path / "run",
        overrides=[f"cluster.shared_memory={str(transport == 'shm').lower()}"],
    )
    assert res.status == "completed", res.reason
    s = _check_same_model(res.run_dir, ref)
    assert s["workers"] == 2
    k = kinds(res.run_dir)
    assert "worker_lost" in k and k.count("generation") == 2 and "recovered" in k
    rec = next(e for e in events(res.run_dir) if e["kind"] == "recovered")
    assert rec["steps_lost"] <= 1
    gen1 = [e for e in events(res.run_dir) if e["kind"] == "generation"][1]
    assert gen1["state_from"] != "checkpoint"  # live state, no checkpoint reloaded
    _check_exactly_once(trace, s["train"]["count"])


def test_kill_two_of_four_at_the_same_step(setup, tmp_path, monkeypatch):
    root, job, ref = setup
    monkeypatch.setenv("LEPTON_FAULTS", "kill:rank=1:step=9;kill:rank=3:step=9")
    res = lepton.train(job, workers=4, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    assert _check_same_model(res.run_dir, ref)["workers"] == 2
    assert kinds(res.run_dir).count("worker_lost") == 2


def test_killed_worker_is_restarted_and_rejoins(setup, tmp_path, monkeypatch):
    root, job, ref = setup
    # min_workers=3: the survivors wait for the replacement (it takes seconds to start) instead of
    # racing it to the end of the run, so it joins whatever the machine's speed
    monkeypatch.setenv("LEPTON_FAULTS", "kill:rank=2:step=7")
    res = lepton.train(
        job,
        workers=3,
        run_dir=tmp_path / "run",
        overrides=["cluster.restart_failed=true", "cluster.min_workers=3", "cluster.wait_for_workers_s=120"],
    )
    assert res.status == "completed", res.reason
    s = _check_same_model(res.run_dir, ref)
    k = kinds(res.run_dir)
    assert "worker_restarted" in k and k.count("worker_registered") == 4
    assert s["workers"] == 3  # the replacement joined a later generation


def test_worker_failing_at_start_is_not_restarted_forever(setup, tmp_path):
    root, _, _ = setup
    r = run_cli(
        "train",
        root / "job.yaml",
        "--workers",
        2,
        "--run-dir",
        tmp_path / "run",
        "--no-progress",
        "--set",
        "cluster.restart_failed=true",
        "--set",
        "cluster.max_restarts=2",
        env={"LEPTON_FAULTS": "crash:at=start:always=1"},
        timeout=120,
    )
    assert r.returncode == 1
    # before training started: the start-up rule fails the run naming the last worker and its log
    assert re.search(
        r"worker-\d exited with code 17 before training started \(log: \S+worker-\d\.log\)", r.stderr
    )
    assert "no restart left (cluster.max_restarts=2)" in r.stderr, r.stderr
    assert kinds(tmp_path / "run").count("worker_restarted") == 2


def test_hung_worker_is_removed_after_heartbeat_timeout(setup, tmp_path, monkeypatch):
    root, job, ref = setup
    monkeypatch.setenv("LEPTON_FAULTS", "hang:rank=1:step=10;" + SLOW)
    res = lepton.train(job, workers=3, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    _check_same_model(res.run_dir, ref)
    lost = [e for e in events(res.run_dir) if e["kind"] == "worker_lost"]
    assert len(lost) == 1 and "heartbeat timeout" in lost[0]["detected_by"]


def test_too_few_workers_waits_then_fails_with_a_checkpoint(setup, tmp_path, monkeypatch):
    root, job, _ = setup
    monkeypatch.setenv("LEPTON_FAULTS", "kill:rank=1:step=10")
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run", overrides=["cluster.min_workers=2"])
    assert res.status == "failed"
    assert "fewer than cluster.min_workers=2" in res.reason and "checkpoint is at step 10" in res.reason
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["latest_checkpoint"]["step"] == 10
    assert "waiting" in kinds(tmp_path / "run")


def _step(run_dir) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def test_ctrl_c_then_resume_equals_uninterrupted(setup, procs, tmp_path):
    root, _, ref = setup
    run_dir = tmp_path / "run"
    # slower steps than SLOW: state.json's progress lags up to a second and the stop reaches the
    # workers at their next heartbeat, so the Ctrl-C must land with seconds of the run left (44 steps ×
    # 0.15 s), not ~1.3 s
    p = procs.lepton(
        "train",
        root / "job.yaml",
        "--workers",
        3,
        "--run-dir",
        run_dir,
        "--no-progress",
        env={"LEPTON_FAULTS": "slow:rank=*:seconds=0.15"},
    )
    _wait_for(lambda: _step(run_dir) >= 8, 60, "step 8")
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert p.wait(timeout=60) == 130
    err = p.stderr.read()
    assert "resume with: lepton train --resume --run-dir" in err and "Traceback" not in err
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "stopped" and state["latest_checkpoint"]["step"] == state["step"] < 52
    r = run_cli("train", "--resume", "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 0, r.stderr
    _check_same_model(run_dir, ref)


def test_sigterm_to_a_worker_leaves_gracefully(setup, procs, tmp_path):
    root, _, ref = setup
    run_dir = tmp_path / "run"
    # min_workers=3: after the leave the run waits for the new worker (seconds to start) instead of
    # racing it to the end
    coord = procs.lepton(
        "coordinator",
        root / "job.yaml",
        "--run-dir",
        run_dir,
        "--workers",
        3,
        "--set",
        "cluster.min_workers=3",
        "--set",
        "cluster.wait_for_workers_s=120",
    )
    url = coordinator_url(coord)
    workers = [
        procs.lepton("worker", "--coordinator", url, "--token-file", run_dir / "token") for _ in range(3)
    ]
    _wait_for(lambda: _step(run_dir) >= 8, 60, "step 8")
    workers[1].send_signal(signal.SIGTERM)
    assert workers[1].wait(timeout=30) == 0
    # and a new worker joins the job
    _wait_for(lambda: "worker_left" in kinds(run_dir), 30, "the leave")
    workers.append(procs.lepton("worker", "--coordinator", url, "--token-file", run_dir / "token"))
    assert coord.wait(timeout=120) == 0, coord.stderr.read()
    s = _check_same_model(run_dir, ref)
    ev = events(run_dir)
    assert [e["kind"] for e in ev].count("worker_left") == 1 and "worker_lost" not in [e["kind"] for e in ev]
    gens = [e for e in ev if e["kind"] == "generation"]
    left = next(e["worker"] for e in ev if e["kind"] == "worker_left")
    assert len(gens) == 2 and len(gens[1]["members"]) == 3 and left not in gens[1]["members"]
    assert s["workers"] == 3


def test_coordinator_killed_and_restarted(setup, procs, tmp_path):
    """Workers keep training through a coordinator outage and are adopted by its replacement."""
    root, _, ref = setup
    run_dir = tmp_path / "run"
    bind = f"127.0.0.1:{free_port()}"  # the restarted coordinator binds it again
    coord = procs.lepton(
        "coordinator", root / "job.yaml", "--run-dir", run_dir, "--workers", 2, "--bind", bind
    )
    url = re.search(r"(http://\S+)", coord.stdout.readline()).group(1)
    env = {"LEPTON_FAULTS": "slow:rank=*:seconds=0.1"}
    workers = [
        procs.lepton("worker", "--coordinator", url, "--token-file", run_dir / "token", env=env)
        for _ in range(2)
    ]
    _wait_for(lambda: _step(run_dir) >= 6, 60, "step 6")
    os.killpg(coord.pid, signal.SIGKILL)
    coord.wait(timeout=10)
    time.sleep(1.0)  # the workers train on without it
    coord2 = procs.lepton("coordinator", "--resume", "--run-dir", run_dir, "--bind", bind)
    assert coord2.wait(timeout=120) == 0, coord2.stderr.read()
    for w in workers:
        assert w.wait(timeout=30) == 0, w.stderr.read()
    _check_same_model(run_dir, ref)
    k = kinds(run_dir)
    assert k.count("worker_adopted") == 2 and "worker_lost" not in k
    assert k.count("generation") == 1  # no regroup, no step redone
