"""Several hosts that share only a network, as namespaces on this machine (tests/netns.py), links shaped
by ``tc netem``: Lepton against torchrun + DDP run multi-node across the same namespaces.

    .venv/bin/python benchmarks/multihost.py [--rows 100000] [--rounds 3] [--rates 1gbit,10gbit]
        [--work /tmp/lepton-multihost]   (root: it makes network namespaces)

For each rate (every host's egress shaped to it, 0.1 ms one way, by netem; this kernel has no netem, and
then the rate alone is set by tbf, with no added delay: the table says which):
- 2 hosts and 3 hosts, one worker each (one torch thread): `lepton coordinator` on host 0 and
  `lepton worker --join` on the others, which see neither the run directory nor the data (they fetch it
  from the coordinator before training), against `torchrun --nnodes N --node-rank K` of the reference loop
  (`../shared/bench/ddp_baseline.py`, static rendezvous on host 1, the data on a disk it sees);
- 2 hosts x 2 workers: the hierarchical reduction (shared memory within a host, the leaders on gloo)
  against `cluster.shared_memory: false` (gloo among all four).
The throughput workload (64 -> 256 -> 256 -> 10, Adam, global batch 512, one epoch); samples/s are each
system's training-loop figure (Lepton: summary.json; the baseline: as printed). Every configuration runs
``--rounds`` times, interleaved, and the table shows medians and the paired ratios' median. All hosts
share this machine's 2 cores: with 3 workers or 2 x 2 they compete for them, and the network is a veth
pair through a bridge, so the rate shaping matters more than the wire does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from statistics import median

from throughput import REPO, add_bench_dir, check_bench_dir, interleaved, job_yaml, synthetic_data

sys.path.insert(0, str(REPO / "tests"))

import netns  # noqa: E402

PORT, MASTER_PORT = 7700, 29500


def _wait(procs, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        left = max(1.0, deadline - time.monotonic())
        try:
            rc = p.wait(timeout=left)
        except Exception:
            rc = None
        if rc != 0:
            tails = "\n".join(
                f"--- {log}\n{log.read_text(errors='replace')[-1500:]}" for log in logs if log.exists()
            )
            sys.exit(f"{what}: exit {rc}\n{tails}")


def lepton(h: netns.Hosts, work: Path, data: Path, hosts: int, per_host: int, shm: bool) -> tuple:
    run_dir = work / "run"
    hidden = work / "hidden"  # what the worker hosts must not see: the run and the data
    shutil.rmtree(run_dir, ignore_errors=True)
    hidden.mkdir(parents=True, exist_ok=True)
    (hidden / "job.yaml").write_text(job_yaml(data, 1))
    logs = [work / "coordinator.log"]
    coord = h.lepton(
        0,
        "coordinator",
        hidden / "job.yaml",
        "--bind",
        f"{h.address(0)}:{PORT}",
        "--run-dir",
        run_dir,
        "--workers",
        hosts * per_host,
        "--set",
        f"cluster.shared_memory={'true' if shm else 'false'}",
        log=logs[0],
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "join").exists():
        if coord.poll() is not None or time.monotonic() > deadline:
            _wait([coord], 1, "the coordinator", logs)
        time.sleep(0.1)
    join = work / "join"
    join.write_bytes((run_dir / "join").read_bytes())
    env = {"LEPTON_CACHE_DIR": str(hidden / "cache")}
    workers = []
    for k in range(1, hosts + 1):
        wlogs = [work / f"worker-{k}-{j}.log" for j in range(per_host)]
        logs += wlogs
        args = ("worker", "--join", join, "--threads", 1)
        workers.append(
            h.lepton_many(
                k, per_host, *args, logs=wlogs, hide=[hidden, run_dir], env=env, log=work / f"host-{k}.log"
            )
        )
    _wait([coord, *workers], 600, "lepton", logs)
    summary = json.loads((run_dir / "summary.json").read_text())
    return (float(summary["samples_per_s"]),)


def torchrun(h: netns.Hosts, work: Path, data: Path, hosts: int, bench_dir: Path) -> tuple:
    master = h.address(1)
    procs, logs = [], []
    for k in range(1, hosts + 1):
        log = work / f"torchrun-{k}.log"
        log.unlink(missing_ok=True)
        logs.append(log)
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(hosts), "--nproc-per-node", "1", "--node-rank", str(k - 1),
            "--master-addr", master, "--master-port", str(MASTER_PORT),
            str(bench_dir / "ddp_baseline.py"), "--data", str(data), "--global-batch", "512",
        ]  # fmt: skip
        # gloo needs telling which interface: these hosts' names resolve nowhere (as in many clusters)
        env = {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
        procs.append(h.popen(k, cmd, env=env, log=log))
    _wait(procs, 600, "torchrun", logs)
    line = [l for l in logs[0].read_text().splitlines() if l.startswith("{")][-1]
    return (float(json.loads(line)["samples_per_s"]),)


def _paired(got: dict, x: str, y: str) -> float:
    return median(p[0] / q[0] for p, q in zip(got[x], got[y]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rates", default="1gbit,10gbit")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lepton-multihost"))
    add_bench_dir(ap)
    a = ap.parse_args()
    check_bench_dir(a.bench_dir, "ddp_baseline.py")
    if os.geteuid() != 0:
        sys.exit("benchmarks/multihost.py makes network namespaces: run it as root")
    a.work.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(a.work, a.bench_dir, a.rows)
    h = netns.Hosts(4)
    rows = []
    try:
        for rate in a.rates.split(","):
            applied = h.shape(rate)
            runs = {
                "lepton 2 hosts": lambda: lepton(h, a.work, data, 2, 1, True),
                "torchrun 2 hosts": lambda: torchrun(h, a.work, data, 2, a.bench_dir),
                "lepton 3 hosts": lambda: lepton(h, a.work, data, 3, 1, True),
                "torchrun 3 hosts": lambda: torchrun(h, a.work, data, 3, a.bench_dir),
                "lepton 2x2 hierarchical": lambda: lepton(h, a.work, data, 2, 2, True),
                "lepton 2x2 flat gloo": lambda: lepton(h, a.work, data, 2, 2, False),
            }
            print(f"\n== links: {applied} ==", flush=True)
            got = interleaved(runs, a.rounds)
            med = {name: median(r[0] for r in rs) for name, rs in got.items()}

            rows.append(
                (
                    applied,
                    med,
                    _paired(got, "lepton 2 hosts", "torchrun 2 hosts"),
                    _paired(got, "lepton 3 hosts", "torchrun 3 hosts"),
                    _paired(got, "lepton 2x2 hierarchical", "lepton 2x2 flat gloo"),
                )
            )
    finally:
        h.close()
    print()
    for rate, med, r2, r3, rh in rows:
        print(f"links {rate}:")
        for name, v in med.items():
            print(f"  {name:<26} {v:>10,.0f} samples/s")
        print(f"  lepton / torchrun, 2 hosts     {r2:.2f}  [>= 1.0]  (median of paired rounds)")
        print(f"  lepton / torchrun, 3 hosts     {r3:.2f}  [>= 1.0]")
        print(f"  2x2 hierarchical / flat gloo   {rh:.2f}")


if __name__ == "__main__":
    main()
