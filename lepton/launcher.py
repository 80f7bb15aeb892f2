"""Starting a job: validate, prepare the run directory, start the coordinator, supervise local workers.

``lepton train`` = ``open_run`` + ``CoordinatorServer`` + K ``lepton worker`` subprocesses.
``lepton coordinator`` = the same without the subprocesses. Bad input is refused by ``open_run``
before anything is written (invariant 4).
"""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .console import console
from .coordinator.machine import Coordinator
from .coordinator.server import CoordinatorServer, Listener
from .errors import LeptonError, first_line
from .model import batchnorm, dropout
from .model.builders import build_model, load_init_weights, num_outputs
from .spec import JobSpec, parse_job, read_yaml
from .storage.checkpoint import readable_state_dir
from .storage.prepared import SPLITS, DataCache, cache_state, fingerprint, prepare
from .storage.rundir import RunDir, RunLock, atomic_write_bytes, fsync_dir


@dataclass
class OpenRun:
    job: JobSpec
    run: RunDir
    token: str
    train_rows: int
    resume_checkpoint: dict | None
    factory_pickle: str | None
    previous_generation: int | None = None
    lock: RunLock | None = None       # held while this process runs the run (``release`` when done)

    def release(self) -> None:
        if self.lock:
            self.lock.release()


def default_run_dir(job: JobSpec) -> Path:
    return Path("runs") / f"{job.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def open_run(job: JobSpec | None, run_dir: str | Path | None, resume: bool, workers: int | None = None,
             token: str | None = None, data_from: str | Path | None = None) -> OpenRun:
    """Validate and (for a new run) create the run directory; for ``resume`` reopen an existing one.
    ``data_from``: a new run trains on that run's prepared data (the same split, preprocessing and rows)
    instead of preparing ``job.data`` again. The returned run holds the run directory's lock
    (``OpenRun.release``); a refused one releases it."""
    if resume:
        if run_dir is None:
            raise LeptonError("--resume needs --run-dir DIR (the run to continue)")
        run = RunDir(run_dir)
        if not run.holds_run():
            raise LeptonError(f"{run.root}: no run to resume here (no job.yaml / state.json)")
        state = run.read_state()
        if state.get("status") == "completed":
            raise LeptonError(f"{run.root}: this run already completed; nothing to resume")
        lock = run.lock()
        try:
            return _reopen(run, state, workers, lock)
        except BaseException:
            lock.release()
            raise

    assert job is not None
    run = RunDir(run_dir or default_run_dir(job))
    if run.holds_run():
        raise LeptonError(f"{run.root} already holds a run; pass --resume to continue it or choose another --run-dir")
    if run.root.exists() and not run.root.is_dir():
        raise LeptonError(f"{run.root}: cannot create the run directory: a file of that name exists")
    # hidden files (.gitkeep, a lock left by a start that failed) and a fresh volume's lost+found are no one's data
    if run.root.is_dir() and any(not p.name.startswith(".") and p.name != "lost+found" for p in run.root.iterdir()):
        raise LeptonError(f"{run.root}: this folder is not empty and holds no run; a new run goes into a new or"
                          " empty folder (its files would be overwritten)")
    if data_from is None:
        prepared = prepare(job)             # every data error surfaces here, before any write
        pre, train_rows = prepared.preprocessor, prepared.report["train_rows"]
    else:
        source, train_rows, pre = _prepared_source(data_from)
        _check_same_data(job, pre, source)
    _check_model(job, pre, train_rows)
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LeptonError(f"{run.root}: cannot create the run directory: {e.strerror or e}") from None
    lock = run.lock()
    try:
        factory = job.model.factory
        if callable(factory):
            import cloudpickle
            atomic_write_bytes(run.factory_pickle, cloudpickle.dumps(factory))
        if job.model.init_weights:
            # the run keeps its own copy: a resume or a late worker reads it again (keep_zeros takes its
            # masks from it), whatever happens to the original afterwards
            init = run.init_weights
            _copy_into(Path(job.model.init_weights), init)
            job.model.init_weights = str(init.resolve())
        if data_from is not None:   # before job.yaml: a resume of a run interrupted while linking links again
            atomic_write_bytes(run.data_from_file, str(source.root.resolve()).encode())
        run.write_job(job.to_yaml_dict())
        if data_from is None:
            prepared.write(run, fingerprint(job))
        else:
            _share_prepared(source, run)
        return OpenRun(job, run, run.create_token(token), train_rows, None, _factory_path(run), lock=lock)
    except BaseException:
        lock.release()
        raise


def _reopen(run: RunDir, state: dict, workers: int | None, lock: RunLock) -> OpenRun:
    """``open_run`` for ``--resume``, with the run's lock held."""
    overrides = [f"cluster.workers={workers}"] if workers else []
    job = parse_job(read_yaml(run.job_yaml), source=str(run.job_yaml), overrides=overrides)
    if run.factory_pickle.exists():
        import cloudpickle
        job.model.factory = cloudpickle.loads(run.factory_pickle.read_bytes())
    prepared = cache_state(run, job)
    shared = run.data_from_file.read_text() if run.data_from_file.exists() else None
    if prepared == "missing" and shared:     # the first start ended while linking another run's data
        _share_prepared(_prepared_source(shared)[0], run)
    elif prepared == "missing":              # the first start ended while preparing the data
        prepare(job).write(run, fingerprint(job))
    elif prepared == "changed" and not shared:
        # resuming continues on the data the run trained on, in the same order (design §3); a
        # re-read would change the split, the steps per epoch and the samples left in this epoch
        print(f"lepton: note: {job.data.path} changed (or moved) since this run prepared it; resuming"
              f" with the run's prepared data in {run.data_dir}", file=sys.stderr)
    manifest, cache = _readable_data(run)
    _check_model(job, cache.preprocessor, manifest["train_rows"])   # a run from an older version
    ckpt = state.get("latest_checkpoint")
    if ckpt:
        # this run's own checkpoint of that name: state.json keeps absolute paths, and a run that was
        # moved or copied must not resume from the original's folder
        ckpt = {**ckpt, "path": str(run.checkpoints_dir / Path(ckpt["path"]).name)}
        if readable_state_dir(ckpt["path"]) is None:
            raise LeptonError(f"{run.root}: state.json points at a missing checkpoint {ckpt['path']}")
    return OpenRun(job, run, run.create_token(), manifest["train_rows"], ckpt, _factory_path(run),
                   state.get("generation"), lock)


def _check_model(job: JobSpec, pre, train_rows: int) -> None:
    """Every model error before anything is written or started: it builds, takes ``init_weights``, and
    its BatchNorm layers can be trained as ``model.batch_norm`` says (and a note for random layers whose
    draws depend on the split). On a copy: a factory may hand out one shared instance, which the
    workers' pickle of it must not see converted or loaded."""
    model = build_model(job, pre.input_shape, num_outputs(job.task, pre.classes))
    try:
        model, copied = copy.deepcopy(model), True
    except Exception:      # a model that cannot be copied is checked in place (nothing better to do)
        copied = False
    load_init_weights(job, model)
    _check_outputs(job, model, pre)
    batchnorm.prepare(model, job.model.batch_norm, job.cluster.max_micro_batch)
    batchnorm.check_last_step(model, pre.input_shape, train_rows, job.train.batch_size)
    unkeyed = dropout.unkeyed(model)
    if copied and dropout.convert(model):
        unkeyed += [f"{name} (its input is not batch-first)" for name in dropout.batch_first(model, pre.input_shape)]
    if unkeyed:     # allowed (DDP behaves so), but the user should know the run is not split-invariant
        console.print(f"note: these random layers of the model draw torch's random numbers in each worker's order,"
                      f" so the trained model depends on the worker count and shares: {', '.join(unkeyed)}"
                      " (nn.Dropout and Dropout1d/2d/3d on batch-first inputs do not: their masks are keyed by"
                      " sample)", markup=False, highlight=False)


def _check_outputs(job: JobSpec, model, pre) -> None:
    """A forward pass on two zero rows: a factory model that does not take the data's shape, or gives
    another number of outputs than the task needs, is refused now rather than after an epoch."""
    import torch
    if any(p.device.type != "cpu" for p in model.parameters()):
        return                    # a factory that places its model itself: checked where it trains
    want = num_outputs(job.task, pre.classes)
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((2,) + tuple(pre.input_shape)))
    except Exception as e:        # whatever the user's model raises, the user needs its first line
        raise LeptonError(f"model: a forward pass on a batch of shape {(2,) + tuple(pre.input_shape)} failed:"
                          f" {type(e).__name__}: {first_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 2 or out[0].numel() != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LeptonError(f"model: gives output {got} for a batch of 2, expected (2, {want}) for this"
                          f" {job.task} task ({'classes: ' + str(len(pre.classes)) if pre.classes else 'one value'})")


def _prepared_source(path: str | Path):
    """The run directory ``data_from`` names, its training rows and preprocessor: it must hold complete
    prepared data."""
    source = RunDir(path)
    try:
        manifest, cache = _readable_data(source)
    except LeptonError:
        raise LeptonError(f"{source.data_dir}: no complete prepared data to train on") from None
    return source, manifest["train_rows"], cache.preprocessor


def _share_prepared(source: RunDir, run: RunDir) -> None:
    """``source``'s prepared files into ``run``: hard links (prepared files are only ever replaced by a
    rename, never written in place, so sharing them is safe), a copy across file systems; the manifest
    last, as ``PreparedData.write`` does, so an interrupted copy reads as missing."""
    run.data_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in source.data_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    for name in names + ["manifest.json"]:
        src, dst = source.data_dir / name, run.data_dir / name
        dst.unlink(missing_ok=True)        # left by an interrupted first attempt
        try:
            os.link(src, dst)
        except OSError:
            _copy_into(src, dst)
    fsync_dir(run.data_dir)


def _copy_into(src: Path, dst: Path) -> None:
    """A file copied under a temporary name, fsynced and renamed (invariant 4)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def _check_same_data(job: JobSpec, pre, source: RunDir) -> None:
    """``data_from``'s prepared data must be what ``job`` describes: its task, target and input shape."""
    pairs = [("task", job.task, pre.task), ("data.target", job.data.target, pre.target)]
    if job.data.shape is not None:
        pairs.append(("data.shape", list(job.data.shape), list(pre.shape or [])))
    for field, ours, theirs in pairs:
        if ours != theirs:
            raise LeptonError(f"{source.root}: its prepared data has {field} {theirs!r}, this job's is {ours!r};"
                              " data_from takes a run prepared for the same task and data")


def _readable_data(run: RunDir):
    """The run's manifest and its prepared splits, every file opened once: a file deleted or damaged
    since is one line now, not a traceback from every worker."""
    try:
        manifest = _manifest(run)              # written last: the data is complete
        cache = DataCache(run)
        for split in SPLITS:
            cache.get(split)
        return manifest, cache
    except (OSError, ValueError, KeyError) as e:
        raise LeptonError(f"{run.data_dir}: the prepared data is damaged ({e}); start a new run (or delete"
                          f" {run.data_dir / 'manifest.json'} to prepare it again from data.path)") from None


def _manifest(run: RunDir) -> dict:
    import json
    return json.loads((run.data_dir / "manifest.json").read_text())


def _factory_path(run: RunDir) -> str | None:
    return str(run.factory_pickle) if run.factory_pickle.exists() else None


def start_coordinator(opened: OpenRun, listener: Listener, workers: int | None = None) -> CoordinatorServer:
    target = workers or opened.job.cluster.workers
    coord = Coordinator(opened.job, opened.run, target, train_rows=opened.train_rows,
                        resume_checkpoint=opened.resume_checkpoint, previous_generation=opened.previous_generation)
    return CoordinatorServer(coord, opened.token, listener, opened.factory_pickle).start()


class LocalWorkers:
    """K ``lepton worker`` subprocesses of this machine.

    They are started before the run directory exists (so their start-up overlaps data preparation);
    each one's output is pumped by a thread into memory until ``attach_logs`` names the folder, then
    into ``RUN_DIR/logs/worker-K.log``. The token reaches them through the environment."""

    def __init__(self, url: str, token: str, count: int, threads: int | None = None):
        threads = threads or max(1, (os.cpu_count() or 1) // count)
        # local workers import what the launching process can import (a model factory module, say)
        path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "LEPTON_TOKEN": token,
                    "LEPTON_LOCAL_WORKER": "1"}
        self.cmd = [sys.executable, "-m", "lepton", "worker", "--coordinator", url, "--threads", str(threads)]
        self.gpus = _visible_gpus()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[_LogPump] = []
        self.log_dir: Path | None = None
        self._reported: set[int] = set()
        for _ in range(count):
            self.spawn()

    def spawn(self) -> None:
        """Start one more worker (also used to restart a failed one)."""
        env = self.env
        if self.gpus:                                 # one GPU per local worker, round robin
            env = {**env, "CUDA_VISIBLE_DEVICES": self.gpus[len(self.procs) % len(self.gpus)]}
        p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.procs.append(p)
        self.pumps.append(_LogPump(p.stdout))
        if self.log_dir:
            self.pumps[-1].attach(self.log_dir / f"worker-{len(self.procs) - 1}.log")

    def all_exited(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def attach_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log_dir = folder
        for k, pump in enumerate(self.pumps):
            pump.attach(folder / f"worker-{k}.log")

    def newly_exited(self) -> list[tuple[int, int]]:
        """(pid, exit code) of processes that ended since the last call."""
        out = []
        for p in self.procs:
            if p.pid not in self._reported and p.poll() is not None:
                self._reported.add(p.pid)
                out.append((p.pid, p.returncode))
        return out

    def failure_output(self, lines: int = 15) -> str:
        """The last lines of output of the first worker that failed, to show the user why."""
        for k, p in enumerate(self.procs):
            if p.poll() not in (None, 0):
                self.pumps[k].join(timeout=2)
                return f"worker-{k} output:\n" + "\n".join(self.pumps[k].tail(lines))
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
    import torch
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def _die_with_parent() -> None:
    """Runs in the child before exec: a local worker must not outlive its launcher (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
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

    def attach(self, path: Path) -> None:
        with self.lock:
            self.file = open(path, "ab")
            self.file.writelines(self.buffer)
            self.file.flush()

    def tail(self, lines: int) -> list[str]:
        with self.lock:
            return [b.decode(errors="replace").rstrip("\n") for b in self.buffer[-lines:]]

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            with self.lock:
                self.buffer.append(line)
                del self.buffer[:-200]          # keep a tail for failure_output
                if self.file:
                    self.file.write(line)
                    self.file.flush()
        self.stream.close()
        with self.lock:
            if self.file:
                self.file.close()


class InterruptCounter:
    """Counts SIGINT/SIGTERM while training. The handler only counts: the poll loop acts on it, so
    the handler never needs the coordinator's lock (which the interrupted code may hold)."""

    def __init__(self):
        self.count = 0
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        self.count += 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class LocalSupervisor:
    """Local-worker supervision for ``lepton train``: reports exits to the coordinator, restarts
    failed workers when ``cluster.restart_failed`` (at most ``cluster.max_restarts`` times), fails the
    job when no local worker is left, and turns interrupts into a stop (first) or a kill (second)."""

    def __init__(self, server: CoordinatorServer, local: LocalWorkers, job: JobSpec):
        self.server, self.local, self.cluster = server, local, job.cluster
        self.restarts = 0
        self.handled_interrupts = 0
        self.forced = False

    def check(self, interrupts: int) -> None:
        coord = self.server.coord
        with self.server.lock:
            for pid, code in self.local.newly_exited():
                coord.process_exited(pid, code)
                if code != 0 and self.cluster.restart_failed and not coord.phase.final:
                    if self.restarts < self.cluster.max_restarts:
                        self.restarts += 1
                        self.local.spawn()
                        coord.note("worker_restarted", f"restarted a local worker that exited with code {code}"
                                   f" ({self.restarts}/{self.cluster.max_restarts})")
            if self.local.all_exited() and not coord.phase.final:
                why = (f"local workers keep failing ({self.restarts} restart(s), cluster.max_restarts="
                       f"{self.cluster.max_restarts})" if self.cluster.restart_failed else "every local worker exited")
                coord.fail(why)
            if interrupts > self.handled_interrupts:
                self.handled_interrupts = interrupts
                if interrupts == 1:
                    coord.request_stop("interrupted: checkpoint at the next step boundary, then stop")
                else:
                    self.forced = True
                    coord.stop_now("interrupted twice: stopped at once (the last checkpoint is kept)")
