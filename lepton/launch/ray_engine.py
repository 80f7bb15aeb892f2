"""``lepton.ray.train`` and ``lepton ray``: a job on a Ray cluster, which only places processes.

The coordinator runs in the driver (this process), serving on the driver node's address. Ray reserves
one placement group of N bundles (``resources_per_worker`` each, spread over the nodes) and starts one
actor per bundle; each actor runs ``lepton worker --coordinator URL`` as a subprocess, so the worker is
the same program as everywhere else and its identity is the one Lepton's admission gives it, not the
actor's index. An actor that dies (``ray.kill``, its node lost) is restarted by Ray (``max_restarts``),
which starts a new worker process that registers and joins at the next step boundary; the other workers
never stop (Ray Train restarts every worker from the last reported checkpoint instead). Ray kills an
actor's child processes with it, so a killed actor leaves no worker behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..coordinator.server import Listener
from ..coordinator.tls import wants_tls
from ..errors import LeptonError
from ..spec import JobSpec, as_job
from .run import open_run, start_coordinator

PLACEMENT_TIMEOUT_S = 120.0  # the cluster must find room for every bundle within this


class WorkerProcess:
    """The body of a worker actor: one ``lepton worker`` subprocess, started when the actor is (so a
    restarted actor starts a new one)."""

    def __init__(self, url: str, token: str, ca_pem: str | None, threads: int, env: dict):
        argv = [sys.executable, "-m", "lepton", "worker", "--coordinator", url, "--threads", str(threads)]
        if ca_pem:
            fd, ca = tempfile.mkstemp(prefix="lepton-ca-", suffix=".pem")
            with os.fdopen(fd, "w") as f:
                f.write(ca_pem)
            argv += ["--ca-file", ca]
        self.proc = subprocess.Popen(argv, env={**os.environ, **env, "LEPTON_TOKEN": token})

    def poll(self) -> int | None:
        return self.proc.poll()

    def pid(self) -> int:
        return self.proc.pid


@dataclass
class RayResult:
    status: str
    run_dir: Path | str
    summary: dict | None
    reason: str = ""


def train(
    job: JobSpec | dict | str | Path,
    num_workers: int | None = None,
    resources_per_worker: dict | None = None,
    *,
    run_dir: str | Path | None = None,
    max_restarts: int = 3,
    node_ip: str | None = None,
    on_started=None,
) -> RayResult:
    """Train ``job`` with ``num_workers`` worker actors on the Ray cluster this process is connected to
    (``ray.init()`` first, or it connects to a local one). ``resources_per_worker``: a bundle, e.g.
    ``{"CPU": 2, "GPU": 1}`` (default one CPU). ``node_ip``: the address the coordinator binds and the
    workers dial (default: Ray's address of this node). ``on_started(actors)`` is called once the actors
    exist (tests use it to kill one)."""
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        raise LeptonError("lepton ray needs Ray: pip install 'lepton[ray]'") from None
    spec = as_job(job, [f"cluster.workers={num_workers}"] if num_workers else [])
    n = spec.cluster.workers
    bundle = {"CPU": 1.0, **(resources_per_worker or {})}
    if not ray.is_initialized():
        if node_ip:
            ray.init(_node_ip_address=node_ip)
        else:
            ray.init()
    ip = node_ip or ray.util.get_node_ip_address()
    listener = Listener(ip, 0)
    try:
        opened = open_run(spec, run_dir, False)
    except BaseException:
        listener.close()
        raise
    actors: list = []
    pg = None
    server = None
    try:
        server = start_coordinator(opened, listener, tls=wants_tls("auto", ip))
        pg = placement_group([bundle] * n, strategy="SPREAD")
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise LeptonError(
                f"Ray could not place {n} workers of {bundle} within {PLACEMENT_TIMEOUT_S:g} s"
                f" (the cluster has {ray.cluster_resources()})"
            )
        actor = ray.remote(WorkerProcess)
        ca = server.tls.ca_pem if server.tls else None
        env = {k: os.environ[k] for k in ("PYTHONPATH", "LEPTON_FAULTS") if k in os.environ}
        for i in range(n):
            actors.append(
                actor.options(
                    num_cpus=bundle.get("CPU", 1.0),
                    num_gpus=bundle.get("GPU", 0),
                    max_restarts=max_restarts,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                ).remote(server.url, opened.token, ca, max(1, int(bundle.get("CPU", 1))), env)
            )
        ray.get([a.pid.remote() for a in actors])
        if on_started is not None:
            on_started(actors)
        server.wait()
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if pg is not None:
            remove_placement_group(pg)
        if server is not None:
            server.stop(linger_s=1.0)
        else:
            listener.close()
        opened.release()
    coord = server.coord
    return RayResult(coord.phase.value, opened.run.location, coord.summary, coord.reason)


def add_ray_command(sub) -> None:
    """Register ``lepton ray`` on the CLI's subparsers (dispatched through ``handler``)."""
    p = sub.add_parser("ray", help="train a job on a Ray cluster: one worker actor per worker")
    p.add_argument("job")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--address", help="the Ray cluster to connect to (ray.init address; default: local)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--run-dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_ray)


def cmd_ray(a) -> int:
    if a.workers < 1:
        raise LeptonError(f"--workers {a.workers}: must be at least 1")
    try:
        import ray
    except ImportError:
        raise LeptonError("lepton ray needs Ray: pip install 'lepton[ray]'") from None
    job = as_job(a.job, [*a.overrides, f"cluster.workers={a.workers}"])
    if a.address:
        ray.init(address=a.address)
    resources = {"CPU": a.cpus_per_worker, **({"GPU": a.gpus_per_worker} if a.gpus_per_worker else {})}
    res = train(job, a.workers, resources, run_dir=a.run_dir)
    print(f"run {res.status}: {res.reason} (run directory: {res.run_dir})", flush=True)
    return 0 if res.status == "completed" else 1
