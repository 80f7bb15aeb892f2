"""``lepton slurm``: a job submitted to SLURM, which only places processes (design.md §10).

The sbatch script (``RUN_DIR/.slurm/lepton.sbatch``, a hidden folder a new run may hold) runs, on the
first node of the allocation, the coordinator (``--resume-existing``: a requeued job resumes the same
run directory exactly), and one ``srun`` step per worker, each pinned to its node (``-w``: unpinned
steps of one allocation do not always all start) and overlapping the others' resources (``--overlap``).
A worker step that dies is started again by its loop and the worker rejoins at the next step boundary;
the other steps go on (one step per worker: a task's death ends only its own step, and
``--kill-on-bad-exit=0``). The coordinator writes ``RUN_DIR/join`` (its URL, the token, the run's CA),
which the workers and ``lepton status --run-dir`` on the login node read; the script deletes a previous
join first, so a requeued job's workers never dial the coordinator of the allocation before.

Before the time limit SLURM sends ``USR1`` to the batch shell (``--signal=B:USR1@SECONDS``): the script
stops the coordinator (SIGTERM: a checkpoint of the live state, run ``stopped``) and requeues the job
(``scontrol requeue``), which resumes from that checkpoint. The run directory must be on a filesystem
every node sees, or on object storage.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..errors import LeptonError
from ..spec import JobSpec
from ..storage.rundir import RunDir
from .run import default_run_dir, placed_job

SCRIPT = ".slurm/lepton.sbatch"
PORT = 7000  # the coordinator's API on the first node; its store port is the next one


def script(
    job: JobSpec,
    job_file: Path,
    run_dir: str,
    *,
    nodes: int,
    per_node: int,
    partition: str | None = None,
    time_limit: str | None = None,
    extra: list[str] = (),  # type: ignore[assignment]
    warn_s: int = 120,
    max_restarts: int = 3,
    port: int = PORT,
    python: str = sys.executable,
) -> str:
    """The sbatch script of the module docstring."""
    workers = nodes * per_node
    q = shlex.quote
    lepton = f"{q(python)} -m lepton"
    directives = [
        f"--job-name=lepton-{job.name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={per_node}",
        f"--signal=B:USR1@{warn_s}",
        "--requeue",
        "--open-mode=append",
        f"--output={run_dir}/.slurm/slurm-%j.out",
        *([f"--partition={partition}"] if partition else []),
        *([f"--time={time_limit}"] if time_limit else []),
        *extra,
    ]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives)]
    lines += [
        "# written by `lepton slurm` (lepton/launch/slurm.py); resubmit with: sbatch THIS_FILE",
        "set -u",
        f"RUN_DIR={q(run_dir)}",
        f"JOB={q(str(job_file))}",
        'ADDR="${LEPTON_COORDINATOR_ADDR:-$(hostname -I 2>/dev/null | cut -d" " -f1)}"',
        'ADDR="${ADDR:-$(hostname)}"',
        'rm -f "$RUN_DIR/join"  # a requeued job: never the previous allocation\'s coordinator',
        f'{lepton} coordinator "$JOB" --run-dir "$RUN_DIR" --resume-existing --workers {workers} \\',
        f'    --bind "0.0.0.0:{port}" --store-port {port + 1} --advertise "$ADDR" &',
        "COORD=$!",
        "warned() {  # the time limit is near: a checkpoint, then the job back in the queue",
        '    echo "lepton: time limit near: stopping the coordinator (checkpoint) and requeueing"',
        '    kill -TERM "$COORD"; wait "$COORD"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "}",
        "trap warned USR1",
        'NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        "worker() {  # one worker on node $1, started again (up to the limit) when its step fails",
        "    local tries=0",
        '    until srun --nodes=1 --ntasks=1 -w "$1" --overlap --kill-on-bad-exit=0 \\',
        f"            {lepton} worker \\",
        '            --join "$RUN_DIR/join" --connect-timeout 300; do',
        f'        tries=$((tries + 1)); [ "$tries" -gt {max_restarts} ] && return 1',
        '        kill -0 "$COORD" 2>/dev/null || return 0  # the run is over',
        '        echo "lepton: the worker step on $1 failed; starting it again ($tries)"; sleep 2',
        "    done",
        "}",
        'for node in "${NODES[@]}"; do',
        f'    for k in $(seq {per_node}); do worker "$node" & done',
        "done",
        'wait "$COORD"; CODE=$?',
        "sleep 5  # the workers hear 'exit' on their next poll",
        "jobs -p | xargs -r kill 2>/dev/null",
        'exit "$CODE"',
    ]
    return "\n".join(lines) + "\n"


def add_slurm_command(sub) -> None:
    """Register ``lepton slurm`` on the CLI's subparsers (dispatched through ``handler``)."""
    p = sub.add_parser("slurm", help="submit a job to SLURM (sbatch): the coordinator and srun workers")
    p.add_argument("job")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--workers-per-node", type=int, default=1)
    p.add_argument("--partition")
    p.add_argument("--time", help="the job's time limit (sbatch --time)")
    p.add_argument("--sbatch", action="append", default=[], metavar="ARG", help="one more sbatch option")
    p.add_argument("--run-dir", help="a folder every node sees (default: runs/NAME-TIME)")
    p.add_argument("--port", type=int, default=PORT, help="the coordinator's API port (its store: the next)")
    p.add_argument("--print", action="store_true", help="print the script instead of submitting it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler=cmd_slurm)


def cmd_slurm(a) -> int:
    if a.nodes < 1 or a.workers_per_node < 1:
        raise LeptonError(f"--nodes {a.nodes} --workers-per-node {a.workers_per_node}: both must be >= 1")
    job = placed_job(a.job, a.overrides, a.nodes * a.workers_per_node, "the nodes")
    run = RunDir(a.run_dir or str(default_run_dir(job)))
    if not run.is_local:
        raise LeptonError(f"{run.where()}: lepton slurm needs a --run-dir folder that every node sees")
    where = str(run.root)
    if not a.print:
        missing = [c for c in ("sbatch", "srun", "scontrol") if shutil.which(c) is None]
        if missing:
            raise LeptonError(
                f"{', '.join(missing)}: not on the PATH (run lepton slurm on a SLURM login node)"
            )
        if run.holds_run() and run.read_state().get("status") == "completed":
            raise LeptonError(f"{where}: this run already completed; choose another --run-dir")
    text = script(
        job,
        run.root / ".slurm" / "job.yaml",  # the job as validated, beside the script: what a requeue reads
        where,
        nodes=a.nodes,
        per_node=a.workers_per_node,
        partition=a.partition,
        time_limit=a.time,
        extra=a.sbatch,
        port=a.port,
    )
    if a.print:
        sys.stdout.write(text)
        return 0
    run.storage.write(".slurm/job.yaml", yaml.safe_dump(job.to_yaml_dict(), sort_keys=False).encode())
    run.storage.write(SCRIPT, text.encode())
    cmd = ["sbatch", "--parsable", str(run.root / SCRIPT)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        raise LeptonError(f"sbatch refused the job: {why[-1] if why else f'exit {r.returncode}'}")
    job_id = r.stdout.strip().split(";")[0]
    print(f"submitted batch job {job_id}; run directory {where}", flush=True)
    print(f"follow it with: lepton status --run-dir {where}   (log: {where}/.slurm/slurm-{job_id}.out)")
    return 0
