"""``lepton.ray.train`` on a local Ray instance (all traffic on loopback): three worker actors, one of
them killed by ``ray.kill`` mid-run. Ray restarts it, its new worker rejoins at a step boundary, the
others never stop, and the run ends with the failure-free run's model."""

from __future__ import annotations

import json
import os
import threading

import pytest

import lepton
from conftest import job_dict, make_classification_csv, max_rel_diff, wait_for, weights

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    ray.init(
        num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
        object_store_memory=80 << 20,
    )  # fmt: skip
    yield
    ray.shutdown()


def test_a_killed_actor_is_replaced_and_its_worker_rejoins(local_ray, tmp_path, monkeypatch):
    import lepton.ray as lray

    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    job = job_dict(data, train__epochs=8, checkpoint__every_steps=6)
    job["cluster"].update(heartbeat_timeout_s=3, collective_timeout_s=4, balance="off")
    ref = lepton.train(job, workers=3, run_dir=tmp_path / "ref")
    assert ref.status == "completed", ref.reason

    run_dir = tmp_path / "run"
    monkeypatch.setenv(
        "LEPTON_FAULTS", "slow:rank=*:seconds=0.05"
    )  # room for the kill; no change to the math

    def state() -> dict:
        try:
            return json.loads((run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    killed = []

    def kill_one(actors):
        def later():
            wait_for(lambda: state().get("step", 0) >= 8, 120, "step 8")
            killed.append(ray.get(actors[1].pid.remote()))
            ray.kill(actors[1], no_restart=False)  # as a lost node: Ray restarts the actor

        threading.Thread(target=later, daemon=True).start()

    res = lray.train(job, 3, {"CPU": 1}, run_dir=run_dir, node_ip="127.0.0.1", on_started=kill_one)
    assert res.status == "completed", res.reason
    assert killed, "the actor was never killed"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert "worker_lost" in kinds, kinds
    assert len({e["worker"] for e in events if e["kind"] == "worker_registered"}) == 4  # the replacement
    assert all(e["steps_lost"] == 0 for e in events if e["kind"] == "recovered"), events
    last = [e for e in events if e["kind"] == "generation"][-1]
    assert len(last["members"]) == 3, last  # the replacement trained in the last generation
    assert max_rel_diff(weights(run_dir), weights(ref.run_dir)) <= 1e-4
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # Ray took the killed actor's worker process with it
