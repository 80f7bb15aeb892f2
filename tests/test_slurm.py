"""``lepton slurm`` under real SLURM daemons on this machine (slurmcluster.py: munged, slurmctld and
three slurmd): a submitted job trains to the model of `lepton train` with the same worker count; one
worker's step SIGKILLed by scancel costs at most one step and the worker rejoins; a requeued job resumes
its run directory and ends with the model of the uninterrupted run."""

from __future__ import annotations

import json
import time

import pytest
import yaml

import lepton
import slurmcluster
from conftest import job_dict, make_classification_csv, max_rel_diff, run_cli, wait_for, weights

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster():
    slurmcluster.require()
    c = slurmcluster.SlurmCluster(nodes=3)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-ref")
    data = make_classification_csv(root / "data.csv", rows=400)
    job = job_dict(data, train__epochs=6, checkpoint__every_steps=5, cluster__shares=[0.5, 0.5])
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    res = lepton.train(job, workers=2, run_dir=root / "ref")
    assert res.status == "completed", res.reason
    return root, res


def _submit(cluster, job_file, run_dir, paced: bool = False) -> str:
    """`lepton slurm` on 2 nodes; ``paced``: each step slowed down (no change to the math) so that a
    fault lands mid-run."""
    port = slurmcluster._free_range(2)
    env = {**cluster.env, **({"LEPTON_FAULTS": "slow:rank=*:seconds=0.1"} if paced else {})}
    r = run_cli("slurm", job_file, "--nodes", 2, "--run-dir", run_dir, "--port", port, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("submitted batch job ")[1].split(";")[0]


def _state(run_dir) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _finished(cluster, job_id: str) -> bool:
    return not cluster.run("squeue", "-h", "-j", job_id).stdout.strip()


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line]


def _log(run_dir) -> str:
    return "\n".join(f.read_text(errors="replace")[-3000:] for f in (run_dir / ".slurm").glob("slurm-*.out"))


def test_a_submitted_job_trains_the_model_of_lepton_train(cluster, reference, tmp_path):
    root, ref = reference
    run_dir = tmp_path / "run"
    job_id = _submit(cluster, root / "job.yaml", run_dir)
    wait_for(lambda: _finished(cluster, job_id), 240, f"batch job {job_id} to end")
    assert _state(run_dir).get("status") == "completed", _log(run_dir)
    assert max_rel_diff(weights(run_dir), weights(ref.run_dir)) <= 1e-4
    r = run_cli("status", "--run-dir", run_dir, timeout=30)  # from the "login node": the run's files
    assert r.returncode == 0 and "completed" in r.stdout, (r.stdout, r.stderr)


def test_a_worker_step_killed_by_scancel_costs_at_most_a_step_and_rejoins(cluster, reference, tmp_path):
    root, ref = reference
    run_dir = tmp_path / "run"
    job_id = _submit(cluster, root / "job.yaml", run_dir, paced=True)
    wait_for(lambda: _state(run_dir).get("step", 0) >= 10 or _finished(cluster, job_id), 180, "step 10")
    steps = [
        s for s in cluster.run("squeue", "-h", "-s", "-j", job_id, "-o", "%i").stdout.split() if "." in s
    ]
    worker_steps = sorted(s for s in steps if s.split(".")[1].isdigit())
    assert len(worker_steps) >= 2, (steps, _log(run_dir))
    r = cluster.run("scancel", "--signal=KILL", worker_steps[0])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _finished(cluster, job_id), 240, f"batch job {job_id} to end")
    assert _state(run_dir).get("status") == "completed", _log(run_dir)
    events = _events(run_dir)
    lost = [e for e in events if e["kind"] == "worker_lost"]
    assert lost, sorted({e["kind"] for e in events})
    assert all(e["steps_lost"] <= 1 for e in events if e["kind"] == "recovered")
    assert len({e["worker"] for e in events if e["kind"] == "worker_registered"}) >= 3  # the restarted one
    assert "starting it again" in _log(run_dir)


@pytest.mark.parametrize("how", ["scontrol requeue", "time limit warning"])
def test_a_requeued_job_resumes_its_run_exactly(cluster, reference, tmp_path, how):
    """``scontrol requeue`` (SLURM kills the job: it resumes from the last checkpoint), or the warning
    signal before the time limit (USR1 to the batch shell, as ``--signal=B:USR1@120`` sends it: the
    script stops the coordinator, which checkpoints, and requeues the job itself)."""
    root, ref = reference
    run_dir = tmp_path / "run"
    job_id = _submit(cluster, root / "job.yaml", run_dir, paced=True)
    ckpt = lambda: (_state(run_dir).get("latest_checkpoint") or {}).get("step", 0)  # noqa: E731
    wait_for(lambda: ckpt() >= 10 or _finished(cluster, job_id), 180, "a checkpoint at step 10")
    at = ckpt()
    if how == "scontrol requeue":
        r = cluster.run("scontrol", "requeue", job_id)
    else:
        r = cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    assert r.returncode == 0, r.stderr
    if how == "time limit warning":
        wait_for(lambda: _state(run_dir).get("status") == "stopped", 60, "the coordinator's stop")
        stopped_at = _state(run_dir)["latest_checkpoint"]["step"]
        assert stopped_at == _state(run_dir)["step"], _state(run_dir)  # checkpointed where it stopped
    time.sleep(1)
    wait_for(lambda: _finished(cluster, job_id), 280, f"batch job {job_id} to run again and end")
    assert _state(run_dir).get("status") == "completed", _log(run_dir)
    starts = [e["start_step"] for e in _events(run_dir) if e["kind"] == "generation"]
    assert starts[0] == 0 and starts[-1] >= at, starts
    assert max_rel_diff(weights(run_dir), weights(ref.run_dir)) <= 1e-4


def test_without_sbatch_on_the_path_it_is_one_line(tmp_path):
    import os
    import sys

    from conftest import expect_cli_error

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(make_classification_csv(tmp_path / "d.csv", rows=50))))
    env = {"PATH": os.path.dirname(sys.executable)}  # python, and no SLURM command
    r = run_cli("slurm", job, "--nodes", 2, "--run-dir", tmp_path / "run", env=env, timeout=60)
    expect_cli_error(r, "sbatch, srun, scontrol: not on the PATH")
    assert not (tmp_path / "run").exists()
    r = run_cli("slurm", job, "--nodes", 0, "--print", timeout=60)
    expect_cli_error(r, "--nodes 0")
