"""Local workers of ``lepton train``: K ``lepton worker`` subprocesses, their logs, their supervision,
and ``run_local``, which takes an opened run to its end with them.

    launch = open_local(spec, run_dir)            # or resume=True; the workers start at once
    with launch:                                  # holds the run directory's lock until the end
        outcome = run_local(launch.opened, launch.workers, launch.listener, progress=True)
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..console import TrainingProgress, console
from ..coordinator.auth import dashboard_url
from ..coordinator.failure_policy import Action, FailurePolicy
from ..coordinator.server import CoordinatorServer, Listener
from ..errors import LeptonError
from ..spec import JobSpec
from ..storage.rundir import RunDir, new_token
from .run import OpenRun, open_run, start_coordinator
from .signals import InterruptCounter, InterruptPolicy


class LocalWorkers:
    """K ``lepton worker`` subprocesses of this machine.

    They are started before the run directory exists (so their start-up overlaps data preparation);
    each one's output is pumped by a thread into memory until ``attach_logs`` names the folder, then
    into ``RUN_DIR/logs/worker-K.log``. The token reaches them through the environment."""

    def __init__(self, url: str, token: str, count: int, threads: int | None = None):
        threads = threads or max(1, (os.cpu_count() or 1) // count)
        # local workers import what the launching process can import (a model factory module, say)
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path,
            "LEPTON_TOKEN": token,
            "LEPTON_LOCAL_WORKER": "1",
        }
        self.cmd = [sys.executable, "-m", "lepton", "worker", "--coordinator", url, "--threads", str(threads)]
        self.gpus = _visible_gpus()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[_LogPump] = []
        self.run: RunDir | None = None  # where the logs go, once known (attach_logs)
        self._reported: set[int] = set()
        for _ in range(count):
            self.spawn()

    def spawn(self) -> None:
        """Start one more worker (also used to restart a failed one)."""
        env = {**self.env, "LEPTON_LOCAL_INDEX": str(len(self.procs))}  # worker-K (fault injection)
        if self.gpus:  # one GPU per local worker, round robin
            env = {**env, "CUDA_VISIBLE_DEVICES": self.gpus[len(self.procs) % len(self.gpus)]}
        p = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self.procs.append(p)
        self.pumps.append(_LogPump(p.stdout))
        if self.run is not None:
            self.pumps[-1].attach(self.run.worker_log(len(self.procs) - 1))

    def all_exited(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def attach_logs(self, run: RunDir) -> None:
        """From now on each worker's output also goes to the run's ``logs/worker-K.log``."""
        self.run = run
        for k, pump in enumerate(self.pumps):
            pump.attach(run.worker_log(k))

    def newly_exited(self) -> list[tuple[int, int, int]]:
        """(K, pid, exit code) of processes that ended since the last call (worker-K)."""
        out = []
        for k, p in enumerate(self.procs):
            if p.pid not in self._reported and p.poll() is not None:
                self._reported.add(p.pid)
                out.append((k, p.pid, p.returncode))
        return out

    def running(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def log_name(self, k: int) -> str:
        """Where worker-K's output goes (RUN_DIR/logs/worker-K.log), for messages."""
        rel = RunDir.worker_log_rel(k)
        return str(self.run.locate(rel)) if self.run else rel

    def failure_output(self, lines: int = 15) -> str:
        """The last lines of output of the first worker that failed, to show the user why."""
        for k, p in enumerate(self.procs):
            if p.poll() not in (None, 0):
                self.pumps[k].join(timeout=2)
                tail = self.pumps[k].tail(lines)
                return f"worker-{k} output:\n" + "\n".join(tail) if tail else ""
        return ""

    def wait(self, timeout_s: float = 15.0) -> None:
        """Wait for the workers to exit on their own, then terminate, then kill what is left."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pump in self.pumps:
            pump.join(timeout=5)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        self.wait(timeout_s=5)


def _visible_gpus() -> list[str]:
    """GPU indices this launcher may hand out (honours CUDA_VISIBLE_DEVICES); [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def _die_with_parent() -> None:
    """Runs in the child before exec: a local worker must not outlive its launcher (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the worker still exits once it loses its coordinator


class _LogPump(threading.Thread):
    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.lock = threading.Lock()
        self.buffer: list[bytes] = []
        self.file = None
        self.start()

    def attach(self, file: BinaryIO) -> None:
        """Copy the output into ``file`` (appendable, binary), starting with what was buffered."""
        with self.lock:
            self.file = file
            self.file.writelines(self.buffer)
            self.file.flush()

    def tail(self, lines: int) -> list[str]:
        with self.lock:
            return [b.decode(errors="replace").rstrip("\n") for b in self.buffer[-lines:]]

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            with self.lock:
                self.buffer.append(line)
                del self.buffer[:-200]  # keep a tail for failure_output
                if self.file:
                    self.file.write(line)
                    self.file.flush()
        self.stream.close()
        with self.lock:
            if self.file:
                self.file.close()


class LocalSupervisor:
    """Local-worker supervision for ``lepton train``: reports exits to the coordinator and carries
    out the failure policy's decisions about local processes (``FailurePolicy.local_exit``: restart a
    failed worker while restarts remain; ``no_local_workers``: fail the job when none is left), and
    applies the interrupt policy (``signals.InterruptPolicy``)."""

    def __init__(self, server: CoordinatorServer, local: LocalWorkers, job: JobSpec):
        self.server, self.local = server, local
        self.policy = FailurePolicy(job.cluster)
        self.restarts = 0
        self.interrupts = InterruptPolicy()

    @property
    def forced(self) -> bool:
        """The job was stopped at once (a second interrupt): the local workers are to be killed."""
        return self.interrupts.forced

    def check(self, interrupts: int) -> None:
        coord = self.server.coord
        with self.server.lock:
            for k, pid, code in self.local.newly_exited():
                coord.process_exited(pid, code)
                decision = self.policy.local_exit(code, self.restarts, coord.phase.final)
                if decision.action == Action.RESTART_LOCAL:
                    self.restarts += 1
                    self.local.spawn()
                    coord.note("worker_restarted", decision.reason, worker=f"worker-{k}")
                elif coord.started_at is None:  # the first generation waits for no ghost
                    why = f"; {decision.reason}" if self.policy.cluster.restart_failed else ""
                    coord.workers_left(
                        self.local.running(),
                        f"worker-{k} exited with code {code} before training started"
                        f" (log: {self.local.log_name(k)}){why}",
                    )
            if self.local.all_exited() and not coord.phase.final:
                coord.fail(self.policy.no_local_workers(self.restarts).reason)
            self.interrupts.apply(interrupts, coord)


@dataclass
class LocalLaunch:
    """An opened run with its local workers starting and the listener they will reach the coordinator
    on (``open_local``). As a context manager it releases the run directory's lock at the end."""

    opened: OpenRun
    workers: LocalWorkers
    listener: Listener

    def __enter__(self) -> "LocalLaunch":
        return self

    def __exit__(self, *exc) -> None:
        self.opened.release()  # the run directory is free for a resume or an export


@dataclass
class LocalOutcome:
    """How a local run ended: its status (``completed``, ``stopped``, ``failed``), why, and its summary."""

    status: str
    run_dir: Path | str  # a folder, or a URL (a run on object storage)
    summary: dict | None
    reason: str = ""


def open_local(
    job: JobSpec | None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    workers: int | None = None,
    threads: int | None = None,
    data_from: str | Path | None = None,
) -> LocalLaunch:
    """``open_run`` with ``workers`` local worker processes (the job's ``cluster.workers`` for a new run).
    A new run's workers start first and import torch while the data is prepared (they wait in the
    listener's backlog); a run that cannot be opened stops them again."""
    if resume:
        opened = open_run(None, run_dir, True, workers)
        try:
            listener = Listener()
            local = LocalWorkers(listener.url, opened.token, opened.job.cluster.workers, threads)
        except BaseException:
            opened.release()
            raise
        return LocalLaunch(opened, local, listener)
    assert job is not None
    if job.cluster.device == "cuda" and not torch.cuda.is_available():
        raise LeptonError("cluster.device is 'cuda' but torch sees no GPU on this machine (use auto or cpu)")
    token = new_token()
    listener = Listener()
    local = LocalWorkers(listener.url, token, job.cluster.workers, threads)
    try:
        opened = open_run(job, run_dir, False, token=token, data_from=data_from)
    except BaseException:
        local.wait(timeout_s=0)
        listener.close()
        raise
    return LocalLaunch(opened, local, listener)


def run_local(
    opened: OpenRun, local: LocalWorkers, listener: Listener, progress: bool = False
) -> LocalOutcome:
    """The opened run to its end: its coordinator on ``listener``, the local workers supervised, a
    progress bar when ``progress``. The caller releases the run (``LocalLaunch``)."""
    local.attach_logs(opened.run)
    server = start_coordinator(opened, listener)
    coord = server.coord
    if progress:
        console.print(
            f"dashboard: {dashboard_url(server.url, opened.token)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    supervisor = LocalSupervisor(server, local, opened.job)
    try:
        with TrainingProgress(enabled=progress) as bar, InterruptCounter() as interrupts:

            def poll(status: dict) -> None:
                bar.update(status)
                supervisor.check(interrupts.count)

            server.wait(on_poll=poll)
    finally:
        if supervisor.forced:
            local.kill()
        else:
            local.wait()  # they hear 'exit' on their next poll and leave on their own
        server.stop()
        opened.run.flush()  # the logs' last lines, on an object store
    if coord.phase.value == "failed" and local.failure_output():
        console.print(local.failure_output(), markup=False, highlight=False)
    return LocalOutcome(coord.phase.value, opened.run.location, coord.summary, coord.reason)
