"""Cluster engines: time from submission to the first completed step, and recovery when one of 3 workers
is killed at ~40% of the run, Lepton against the engine's usual way of training (issue 27).

    .venv/bin/python benchmarks/engines.py [--rows 300000] [--kill-at 0.4] [--engines ray,slurm]

Needs Ray Train for its baseline (`pip install 'ray[train]'`) and, for SLURM, Debian's slurm-wlm and munge.

Workload of benchmarks/throughput.py (64 → 256 → 256 → 10, Adam, global batch 512, one epoch), 3
workers with one torch thread each, all on this machine. Every run is started, killed and timed here.

- Ray (a local instance, traffic on loopback): Lepton's `lepton.ray.train` with 3 worker actors, against
  Ray Train's `TorchTrainer` (3 workers, `FailureConfig(max_failures=1)`, a checkpoint reported every 50
  steps and resumed from, as Ray's docs show). The kill: `ray.kill` of one Lepton worker actor (Ray
  restarts it, its worker rejoins), and SIGKILL of one `RayTrainWorker` process (Ray Train restarts
  every worker from the last checkpoint).
- SLURM (real daemons, tests/slurmcluster.py: 3 node names on this machine): `lepton slurm --nodes 3`,
  against `torchrun` under `srun` (one task per node, c10d rendezvous, `--max-restarts 1`) running
  benchmarks/ddp_checkpointed.py (a checkpoint every 50 steps). The kill: `scancel --signal=KILL` of one
  Lepton worker step (the script starts it again), and SIGKILL of one torchrun rank (torchrun restarts
  every rank from the checkpoint).

first step = the first completed training step − submission; recovery = the first step completed after
the kill − the kill; steps lost = steps done before the kill that are done again. Timings on this shared
2-core machine are noisy: compare within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from recovery import _children, _rank, read_jsonl, wait_until
from throughput import VENV_BIN, add_bench_dir, check_bench_dir, job_yaml, synthetic_data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the SLURM cluster of the tests (slurmcluster.py)


# --- Lepton's side: the same measures from its run directory ---------------------------------------
def lepton_times(run_dir: Path, t_submit: float, t_kill: float) -> dict:
    metrics, events = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "events.jsonl")
    firsts = [r for r in metrics if r.get("kind") == "generation_first_step"]
    after = [r for r in firsts if r["time"] > t_kill]
    recovered = [e for e in events if e["kind"] == "recovered" and e["time"] > t_kill]
    return {
        "first_step_s": firsts[0]["time"] - t_submit if firsts else None,
        "recovery_s": after[0]["time"] - t_kill if after else None,
        "steps_lost": recovered[0]["steps_lost"] if recovered else None,
    }


def _at(run_dir: Path, kill_at: float):
    try:
        st = json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return st if st.get("total_steps") and st["step"] >= kill_at * st["total_steps"] else None


# --- Ray --------------------------------------------------------------------------------------------
def lepton_ray(job: Path, work: Path, kill_at: float) -> dict:
    import ray

    import lepton.ray as lray

    run_dir = work / "engines-lepton-ray"
    shutil.rmtree(run_dir, ignore_errors=True)
    kill: dict = {}

    def killer(actors):
        def later():
            wait_until(lambda: _at(run_dir, kill_at), timeout=600)
            kill["time"] = time.time()
            ray.kill(actors[1], no_restart=False)

        threading.Thread(target=later, daemon=True).start()

    t0 = time.time()
    res = lray.train(job, 3, {"CPU": 1}, run_dir=run_dir, node_ip="127.0.0.1", on_started=killer)
    wall = time.time() - t0
    return {"outcome": res.status, **lepton_times(run_dir, t0, kill.get("time", wall + t0)), "wall_s": wall}


def ray_train_loop(config: dict) -> None:
    """Ray Train's side: ddp_checkpointed.py's loop written for Ray Train (its checkpoint API)."""
    import tempfile

    import ray.train as rt
    import torch
    from ray.train.torch import prepare_model
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.set_num_threads(1)
    sys.path.insert(0, config["bench_dir"])
    from ddp_baseline import read_csv

    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x, y = read_csv(config["data"])
    n = len(y) - len(y) // 10
    ds = TensorDataset(torch.from_numpy(x[:n]), torch.from_numpy(y[:n]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, int(y.max()) + 1),
    )  # fmt: skip
    model = prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = 0
    ckpt = rt.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(ds, batch_size=512 // world, sampler=sampler, drop_last=True)
    progress = Path(config["progress"])
    if rank == 0:
        with open(progress, "a") as f:
            f.write(json.dumps({"event": "start", "resumed_at": start, "time": time.time()}) + "\n")
    with open(progress.with_suffix(".pids"), "a") as f:  # the killer picks rank 1's process from here
        f.write(json.dumps({"rank": rank, "pid": os.getpid()}) + "\n")
    loss_fn = torch.nn.CrossEntropyLoss()
    for step, (xb, yb) in enumerate(loader):
        if step < start:
            continue  # fast-forward the sampler to where the checkpoint was
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        done = step + 1
        if rank == 0:
            with open(progress, "a") as f:
                f.write(json.dumps({"event": "step", "step": done, "time": time.time()}) + "\n")
        if done % 50 == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save(
                        {"model": model.state_dict(), "opt": opt.state_dict(), "step": done},
                        Path(d) / "state.pt",
                    )
                rt.report({"step": done}, checkpoint=rt.Checkpoint.from_directory(d) if rank == 0 else None)


def ray_train(data: Path, work: Path, kill_at: float, bench_dir: Path, rows: int) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d = work / "engines-ray-train"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    progress = d / "progress.jsonl"
    per_epoch = (rows - rows // 10) // 3 // (512 // 3)
    kill: dict = {}

    def killer():
        wait_until(
            lambda: any(
                r["event"] == "step" and r["step"] >= kill_at * per_epoch for r in read_jsonl(progress)
            ),
            timeout=600,
        )
        pids = [r["pid"] for r in read_jsonl(progress.with_suffix(".pids")) if r["rank"] == 1]
        kill["time"] = time.time()
        os.kill(pids[-1], signal.SIGKILL)

    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"data": str(data), "bench_dir": str(bench_dir), "progress": str(progress)},
        scaling_config=ScalingConfig(num_workers=3, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(d / "storage"), failure_config=FailureConfig(max_failures=1)),
    )
    threading.Thread(target=killer, daemon=True).start()
    t0 = time.time()
    try:
        trainer.fit()
        outcome = "completed"
    except Exception as e:  # its own failure: reported, the row still says what happened
        outcome = f"failed: {type(e).__name__}"
    wall = time.time() - t0
    log = read_jsonl(progress)
    steps = [r for r in log if r["event"] == "step"]
    t_kill = kill.get("time", float("inf"))
    before = max((r["step"] for r in steps if r["time"] <= t_kill), default=0)
    restart = next((r for r in log if r["event"] == "start" and r["time"] > t_kill), None)
    first = next((r for r in steps if restart and r["time"] > restart["time"]), None)
    return {
        "outcome": outcome,
        "first_step_s": steps[0]["time"] - t0 if steps else None,
        "recovery_s": first["time"] - t_kill if first else None,
        "steps_lost": before - restart["resumed_at"] if restart else None,
        "wall_s": wall,
    }


# --- SLURM ------------------------------------------------------------------------------------------
def lepton_slurm(cluster, job: Path, work: Path, kill_at: float) -> dict:
    from slurmcluster import _free_range

    run_dir = work / "engines-lepton-slurm"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(VENV_BIN / "lepton"), "slurm", str(job), "--nodes", "3", "--run-dir", str(run_dir)]
    t0 = time.time()
    r = subprocess.run([*cmd, "--port", str(_free_range(2))], env=cluster.env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lepton slurm failed: {r.stderr}")
    job_id = r.stdout.split("submitted batch job ")[1].split(";")[0]
    wait_until(lambda: _at(run_dir, kill_at), timeout=600)
    listed = cluster.run("squeue", "-h", "-s", "-j", job_id, "-o", "%i").stdout.split()
    victim = sorted(s for s in listed if "." in s and s.split(".")[1].isdigit())[1]
    t_kill = time.time()
    cluster.run("scancel", "--signal=KILL", victim)
    wait_until(lambda: not cluster.run("squeue", "-h", "-j", job_id).stdout.strip(), timeout=900, every=0.5)
    wall = time.time() - t0
    status = json.loads((run_dir / "state.json").read_text()).get("status")
    return {"outcome": status, **lepton_times(run_dir, t0, t_kill), "wall_s": wall}


def torchrun_slurm(
    cluster, data: Path, work: Path, kill_at: float, bench_dir: Path, rows: int, timeout_s: float = 240
) -> dict:
    from slurmcluster import _free_range

    d = work / "engines-torchrun-slurm"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    progress = d / "progress.jsonl"
    script = d / "torchrun.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=3\n#SBATCH --ntasks-per-node=1\n"
        f"#SBATCH --output={d}/slurm-%j.out\n"
        f"srun --nodes=3 --ntasks-per-node=1 {VENV_BIN / 'torchrun'} --nnodes=3 --nproc-per-node=1"
        f" --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{_free_range(1)} --rdzv-id=bench --max-restarts=1"
        f" {REPO / 'benchmarks' / 'ddp_checkpointed.py'} --data {data} --bench-dir {bench_dir}"
        f" --ckpt {d} --progress {progress}\n"
    )
    per_epoch = (rows - rows // 10) // 3 // (512 // 3)
    t0 = time.time()
    r = cluster.run("sbatch", "--parsable", script)
    job_id = r.stdout.strip().split(";")[0]
    wait_until(
        lambda: any(r["event"] == "step" and r["step"] >= kill_at * per_epoch for r in read_jsonl(progress)),
        timeout=600,
    )
    # a rank other than 0: a child of a torchrun agent whose environment says RANK=1
    agents = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "torchrun --nnodes=3"], capture_output=True, text=True
        ).stdout.split()
    ]
    victim = next(c for a in agents for c in _children(a) if _rank(c) == 1)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    hung = None
    try:
        wait_until(
            lambda: not cluster.run("squeue", "-h", "-j", job_id).stdout.strip(), timeout=timeout_s, every=0.5
        )
    except SystemExit:  # still running: it did not recover (a hang is an outcome, not the end of the table)
        cluster.run("scancel", "--signal=KILL", "--full", job_id)
        hung = f"hung: cancelled after {timeout_s:g} s"
    wall = time.time() - t0
    log = read_jsonl(progress)
    steps = [r for r in log if r["event"] == "step"]
    before = max((r["step"] for r in steps if r["time"] <= t_kill), default=0)
    restart = next((r for r in log if r["event"] == "start" and r["time"] > t_kill), None)
    first = next((r for r in steps if restart and r["time"] > restart["time"]), None)
    done = any(r["event"] == "done" for r in log)
    return {
        "outcome": hung or ("completed" if done else "failed"),
        "first_step_s": steps[0]["time"] - t0 if steps else None,
        "recovery_s": first["time"] - t_kill if first else None,
        "steps_lost": before - restart["resumed_at"] if restart else None,
        "wall_s": wall,
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--kill-at", type=float, default=0.4)
    ap.add_argument("--engines", default="ray,slurm")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lepton-bench"))
    add_bench_dir(ap)
    a = ap.parse_args()
    check_bench_dir(a.bench_dir, "ddp_baseline.py")
    a.work.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(a.work, a.bench_dir, a.rows)
    job = a.work / "engines-job.yaml"
    job.write_text(job_yaml(data, 1).replace("checkpoint: {every_steps: 0}", "checkpoint: {every_steps: 50}"))
    rows: list[tuple[str, str, dict]] = []

    class Rows(list):  # each row printed as it is measured: a later hang must not lose the earlier ones
        def append(self, row) -> None:
            print(json.dumps({"engine": row[0], "system": row[1], **row[2]}), flush=True)
            super().append(row)

    rows = Rows()
    engines = a.engines.split(",")
    if "ray" in engines:
        import ray

        os.environ.setdefault("RAY_TMPDIR", str(a.work / "ray"))
        ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        rows.append(("Ray", "Lepton (lepton.ray.train)", lepton_ray(job, a.work, a.kill_at)))
        rows.append(
            ("Ray", "Ray Train (max_failures=1)", ray_train(data, a.work, a.kill_at, a.bench_dir, a.rows))
        )
        ray.shutdown()
    if "slurm" in engines:
        from slurmcluster import SlurmCluster

        cluster = SlurmCluster(nodes=3)
        try:
            rows.append(("SLURM", "Lepton (lepton slurm)", lepton_slurm(cluster, job, a.work, a.kill_at)))
            rows.append(
                (
                    "SLURM",
                    "torchrun under srun (--max-restarts 1)",
                    torchrun_slurm(cluster, data, a.work, a.kill_at, a.bench_dir, a.rows),
                )
            )
        finally:
            cluster.close()
    print(f"\n{a.rows} rows, 3 workers, one killed at {a.kill_at:.0%} of the run\n")
    head = (
        f"{'engine':6} {'system':40} {'outcome':24} {'first step s':>12} {'recovery s':>10}"
        f" {'steps lost':>10} {'wall s':>7}"
    )
    print(head)
    print("-" * len(head))
    for engine, system, r in rows:
        print(
            f"{engine:6} {system:40} {str(r['outcome'])[:24]:24} {_fmt(r['first_step_s']):>12}"
            f" {_fmt(r['recovery_s']):>10} {_fmt(r['steps_lost']):>10} {_fmt(r['wall_s']):>7}"
        )
    print(json.dumps([{"engine": e, "system": s, **r} for e, s, r in rows]))


if __name__ == "__main__":
    main()
