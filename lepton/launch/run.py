"""Opening a run: validate the job, prepare (or reopen) the run directory, start its coordinator.

``open_run`` refuses bad input before anything is written (invariant 4): the run directory, its data,
the model (it builds, takes ``init_weights``, fits the data's shape and the task's outputs) and, for a
resume, the checkpoint it continues from. ``start_coordinator`` serves the opened run.
"""

from __future__ import annotations

import copy
import json
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import cloudpickle
import torch

from ..console import console
from ..coordinator.controller import Controller
from ..coordinator.server import CoordinatorServer, Listener
from ..coordinator.state import Phase
from ..coordinator.tls import server_tls
from ..errors import LeptonError, first_line
from ..model import batchnorm, dropout
from ..model.builders import build_model, load_init_weights, num_outputs
from ..spec import JobSpec, as_job, parse_job, read_yaml
from ..storage.checkpoint import readable_state_dir
from ..storage.prepared import MANIFEST as DATA_MANIFEST
from ..storage.prepared import SPLITS, DataCache, cache_state, fingerprint, prepare, share_prepared
from ..storage.rundir import CHECKPOINTS_DIR, DATA_DIR, FACTORY_PICKLE, JOB_YAML, RunDir, RunLock


@dataclass
class OpenRun:
    job: JobSpec
    run: RunDir
    token: str
    train_rows: int
    resume_checkpoint: dict | None
    factory_pickle: str | None
    previous_generation: int | None = None
    lock: RunLock | None = None  # held while this process runs the run (``release`` when done; none
    # on an object store)

    def release(self) -> None:
        if self.lock:
            self.lock.release()


def placed_job(path: str, overrides: list[str], workers: int, where: str) -> JobSpec:
    """The job a cluster engine runs (``lepton slurm``, ``lepton k8s``): validated with its worker count,
    and a model factory given by name, since ``where`` (the nodes, the pods) import it themselves."""
    job = as_job(path, [*overrides, f"cluster.workers={workers}"])
    if callable(job.model.factory):
        raise LeptonError(f"model.factory: {where} import it by name: give it as pkg.module:name")
    return job


def default_run_dir(job: JobSpec) -> Path:
    return Path("runs") / f"{job.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def open_run(
    job: JobSpec | None,
    run_dir: str | Path | None,
    resume: bool,
    workers: int | None = None,
    token: str | None = None,
    data_from: str | Path | None = None,
) -> OpenRun:
    """Validate and (for a new run) create the run directory; for ``resume`` reopen an existing one.
    ``data_from``: a new run trains on that run's prepared data (the same split, preprocessing and rows)
    instead of preparing ``job.data`` again. The returned run holds the run directory's lock
    (``OpenRun.release``); a refused one releases it."""
    if resume:
        if run_dir is None:
            raise LeptonError("--resume needs --run-dir DIR (the run to continue)")
        run = RunDir(run_dir)
        if not _holds_run(run):
            raise LeptonError(f"{run.where()}: no run to resume here (no job.yaml / state.json)")
        state = run.read_state()
        if state.get("status") == "completed":
            raise LeptonError(f"{run.where()}: this run already completed; nothing to resume")
        lock = run.lock()
        try:
            return _reopen(run, state, workers, lock)
        except BaseException:
            if lock:
                lock.release()
            raise

    assert job is not None
    run = RunDir(run_dir or default_run_dir(job))
    _check_new_run_dir(run)
    if data_from is None:
        prepared = prepare(job)  # every data error surfaces here, before any write
        pre, train_rows = prepared.preprocessor, prepared.report["train_rows"]
    else:
        source, train_rows, pre = _prepared_source(data_from)
        _check_same_data(job, pre, source)
    _check_model(job, pre, train_rows)
    if run.is_local:
        try:
            run.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LeptonError(f"{run.root}: cannot create the run directory: {e.strerror or e}") from None
    lock = run.lock()
    try:
        factory = job.model.factory
        if callable(factory):
            run.write_factory(cloudpickle.dumps(factory))
        if job.model.init_weights:
            # the run keeps its own copy: a resume or a late worker reads it again (keep_zeros takes its
            # masks from it), whatever happens to the original afterwards
            job.model.init_weights = str(run.copy_init_weights(Path(job.model.init_weights)))
        if data_from is not None:  # before job.yaml: a resume of a run interrupted while linking links again
            run.write_data_from(str(source.root.resolve()) if source.is_local else source.where())
        run.write_job(job.to_yaml_dict())
        if data_from is None:
            prepared.write(run, fingerprint(job))
        else:
            share_prepared(source, run)
        return OpenRun(job, run, run.create_token(token), train_rows, None, _factory_path(run), lock=lock)
    except BaseException:
        if lock:
            lock.release()
        raise


def _holds_run(run: RunDir) -> bool:
    try:
        return run.holds_run()
    except OSError as e:  # a bucket that does not exist, credentials refused, a store that is down
        raise LeptonError(f"{run.where()}: cannot read the run directory: {first_line(e)}") from None


def _check_new_run_dir(run: RunDir) -> None:
    """A new run goes into a new or empty folder (or prefix, on an object store): never over a run, nor
    over someone's files."""
    if _holds_run(run):
        raise LeptonError(
            f"{run.where()} already holds a run; pass --resume to continue it or choose another --run-dir"
        )
    if run.is_local and run.root.exists() and not run.root.is_dir():
        raise LeptonError(f"{run.root}: cannot create the run directory: a file of that name exists")
    # hidden files (.gitkeep, a lock left by a start that failed) and a fresh volume's lost+found
    # are no one's data
    try:
        names = run.storage.list("")
    except OSError as e:
        raise LeptonError(f"{run.where()}: cannot read the run directory: {first_line(e)}") from None
    if any(not n.startswith(".") and n != "lost+found/" for n in names):
        raise LeptonError(
            f"{run.where()}: this folder is not empty and holds no run; a new run goes into a new or"
            " empty folder (its files would be overwritten)"
        )
    if not run.is_local:  # a bucket that is missing or read-only: now, not after preparing the data
        probe = f".lepton-probe-{secrets.token_hex(4)}"
        try:
            run.storage.write(probe, b"")
            run.storage.delete(probe)
        except OSError as e:
            raise LeptonError(f"{run.where()}: cannot write the run directory: {first_line(e)}") from None


def _read_job(run: RunDir) -> dict:
    if run.is_local:
        return read_yaml(run.job_yaml)  # its errors name the file, line and column
    try:
        return run.read_job_dict()
    except (OSError, ValueError) as e:
        raise LeptonError(f"{run.where(JOB_YAML)}: unreadable job ({first_line(e)})") from None


def _reopen(run: RunDir, state: dict, workers: int | None, lock: RunLock | None) -> OpenRun:
    """``open_run`` for ``--resume``, with the run's lock held."""
    overrides = [f"cluster.workers={workers}"] if workers else []
    job = parse_job(_read_job(run), source=run.where(JOB_YAML), overrides=overrides)
    blob = run.read_factory()
    if blob is not None:
        job.model.factory = cloudpickle.loads(blob)
    prepared = cache_state(run, job)
    shared = run.read_data_from()
    if prepared == "missing" and shared:  # the first start ended while linking another run's data
        share_prepared(_prepared_source(shared)[0], run)
    elif prepared == "missing":  # the first start ended while preparing the data
        prepare(job).write(run, fingerprint(job))
    elif prepared == "changed" and not shared:
        # resuming continues on the data the run trained on, in the same order; a
        # re-read would change the split, the steps per epoch and the samples left in this epoch
        print(
            f"lepton: note: {job.data.path} changed (or moved) since this run prepared it; resuming"
            f" with the run's prepared data in {run.where(DATA_DIR)}",
            file=sys.stderr,
        )
    manifest, cache = _readable_data(run)
    _check_model(job, cache.preprocessor, manifest["train_rows"])  # a run from an older version
    ckpt = state.get("latest_checkpoint")
    if ckpt:
        # this run's own checkpoint of that name: state.json keeps absolute paths, and a run that was
        # moved or copied must not resume from the original's folder
        rel = f"{CHECKPOINTS_DIR}/{str(ckpt['path']).rstrip('/').rpartition('/')[2]}"
        ckpt = {**ckpt, "path": str(run.locate(rel))}
        if readable_state_dir(rel, storage=run.storage) is None:
            raise LeptonError(f"{run.where()}: state.json points at a missing checkpoint {ckpt['path']}")
    return OpenRun(
        job,
        run,
        run.create_token(),
        manifest["train_rows"],
        ckpt,
        _factory_path(run),
        state.get("generation"),
        lock,
    )


def _check_model(job: JobSpec, pre, train_rows: int) -> None:
    """Every model error before anything is written or started: it builds, takes ``init_weights``, and
    its BatchNorm layers can be trained as ``model.batch_norm`` says (and a note for random layers whose
    draws depend on the split). On a copy: a factory may hand out one shared instance, which the
    workers' pickle of it must not see converted or loaded."""
    model = build_model(job, pre.input_shape, num_outputs(job.task, pre.classes))
    try:
        model, copied = copy.deepcopy(model), True
    except Exception:  # a model that cannot be copied is checked in place (nothing better to do)
        copied = False
    load_init_weights(job, model)
    _check_outputs(job, model, pre)
    batchnorm.prepare(model, job.model.batch_norm, job.cluster.max_micro_batch)
    batchnorm.check_last_step(model, pre.input_shape, train_rows, job.train.batch_size)
    unkeyed = dropout.unkeyed(model)
    if copied and dropout.convert(model):
        unkeyed += [
            f"{name} (its input is not batch-first)" for name in dropout.batch_first(model, pre.input_shape)
        ]
    if unkeyed:  # allowed (DDP behaves so), but the user should know the run is not split-invariant
        console.print(
            f"note: these random layers of the model draw torch's random numbers in each worker's order,"
            f" so the trained model depends on the worker count and shares: {', '.join(unkeyed)}"
            " (nn.Dropout and Dropout1d/2d/3d on batch-first inputs do not: their masks are keyed by"
            " sample)",
            markup=False,
            highlight=False,
        )


def _check_outputs(job: JobSpec, model, pre) -> None:
    """A forward pass on two zero rows: a factory model that does not take the data's shape, or gives
    another number of outputs than the task needs, is refused now rather than after an epoch."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return  # a factory that places its model itself: checked where it trains
    want = num_outputs(job.task, pre.classes)
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((2,) + tuple(pre.input_shape)))
    except Exception as e:  # whatever the user's model raises, the user needs its first line
        raise LeptonError(
            f"model: a forward pass on a batch of shape {(2,) + tuple(pre.input_shape)} failed:"
            f" {type(e).__name__}: {first_line(e)}"
        ) from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 2 or out[0].numel() != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LeptonError(
            f"model: gives output {got} for a batch of 2, expected (2, {want}) for this"
            f" {job.task} task ({'classes: ' + str(len(pre.classes)) if pre.classes else 'one value'})"
        )


def _prepared_source(path: str | Path):
    """The run directory ``data_from`` names, its training rows and preprocessor: it must hold complete
    prepared data."""
    source = RunDir(path)
    try:
        manifest, cache = _readable_data(source)
    except LeptonError:
        raise LeptonError(f"{source.where(DATA_DIR)}: no complete prepared data to train on") from None
    return source, manifest["train_rows"], cache.preprocessor


def _check_same_data(job: JobSpec, pre, source: RunDir) -> None:
    """``data_from``'s prepared data must be what ``job`` describes: its task, target and input shape."""
    pairs: list[tuple[str, Any, Any]] = [
        ("task", job.task, pre.task),
        ("data.target", job.data.target, pre.target),
    ]
    if job.data.shape is not None:
        pairs.append(("data.shape", list(job.data.shape), list(pre.shape or [])))
    for field, ours, theirs in pairs:
        if ours != theirs:
            raise LeptonError(
                f"{source.where()}: its prepared data has {field} {theirs!r}, this job's is {ours!r};"
                " data_from takes a run prepared for the same task and data"
            )


def _readable_data(run: RunDir):
    """The run's manifest and its prepared splits, every file opened once: a file deleted or damaged
    since is one line now, not a traceback from every worker."""
    try:
        manifest = _manifest(run)  # written last: the data is complete
        cache = DataCache(run)
        for split in SPLITS:
            cache.get(split)
        return manifest, cache
    except (OSError, ValueError, KeyError) as e:
        raise LeptonError(
            f"{run.where(DATA_DIR)}: the prepared data is damaged ({e}); start a new run (or delete"
            f" {run.where(DATA_MANIFEST)} to prepare it again from data.path)"
        ) from None


def _manifest(run: RunDir) -> dict:
    return json.loads(run.storage.read(DATA_MANIFEST).decode())


def _factory_path(run: RunDir) -> str | None:
    """The pickled model factory as a local file (the coordinator serves it to workers that register)."""
    if not run.storage.exists(FACTORY_PICKLE):
        return None
    return str(run.storage.local_path(FACTORY_PICKLE))


def start_coordinator(
    opened: OpenRun, listener: Listener, workers: int | None = None, tls: bool = False
) -> CoordinatorServer:
    """The coordinator of ``opened`` serving on ``listener``; ``tls``: HTTPS with the run's own CA
    (coordinator/tls.py)."""
    target = workers or opened.job.cluster.workers
    coord = Controller(
        opened.job,
        opened.run,
        target,
        train_rows=opened.train_rows,
        resume_checkpoint=opened.resume_checkpoint,
        previous_generation=opened.previous_generation,
    )
    certs = server_tls(opened.run, listener.public_host) if tls else None
    return CoordinatorServer(coord, opened.token, listener, opened.factory_pickle, certs).start()


START_NOTICE_S = 30.0  # how often ``lepton coordinator`` says it is still waiting for its first workers


class StartNotices:
    """While a coordinator waits for its first generation: a line at once and every ``START_NOTICE_S``
    saying how many workers registered of how many, until when, and the command that starts one (a
    user who sees nothing happen must not have to guess)."""

    def __init__(self, command: str, clock=time.monotonic):
        self.command, self.clock = command, clock
        self.last: float | None = None

    def line(self, coord: Controller) -> str | None:
        """The next line to print, if one is due (call with the coordinator's lock held)."""
        now = self.clock()
        if coord.started_at is not None or coord.phase != Phase.WAITING:
            return None
        if self.last is not None and now - self.last < START_NOTICE_S:
            return None
        self.last = now
        members = list(coord.members.values())
        registered = sum(not m.state.gone for m in members)
        ready = sum(m.state.alive for m in members)
        cluster = coord.job.cluster
        left = max(0.0, cluster.start_timeout_s - (coord.clock() - coord.opened_at))
        return (
            f"waiting for workers: {registered} of {coord.target_workers} registered ({ready} ready);"
            f" the run fails in {left:.0f} s (cluster.start_timeout_s); start a worker with: {self.command}"
        )
