"""``lepton worker``: the worker lifecycle.

register → wait for a generation → join its process group → receive the state by broadcast from
rank 0 → train → on a collective error, a regroup flag or a leave request: pause, report the step,
and wait for the next generation. The training loop talks to the coordinator only through a
background ``Reporter`` (heartbeats, metric records) so that no step ever waits on HTTP; it looks at
the plan only between generations. If the coordinator is unreachable, the data plane goes on and
control calls are retried for ``cluster.coordinator_timeout_s``.

A generation ends in a ``GenerationOutcome``: ``_train_steps`` runs the steps to the end or to an
agreed pause, ``_finish_run`` the final phase (keep-best, final evaluations, the model). The
heartbeat thread is worker/reporter.py; cores and threads are worker/placement.py.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import torch

from ..client import CoordinatorClient, CoordinatorUnreachable
from ..comm import CommError, GenerationGroup, Unreachable
from ..comm.net import address_of, data_plane_interface
from ..comm.shm import MAX_WORLD
from ..errors import LeptonError
from ..policies import Decision
from ..protocol import Generation, RegisterRequest, Report, StepPlan
from ..records import (
    BestRecord,
    DecisionRecord,
    EvalRecord,
    GenerationFirstStepRecord,
    PlanRecord,
    SkippedStepRecord,
    TrainRecord,
)
from ..spec import JobSpec, KeepBestSpec, parse_job
from ..storage.checkpoint import (
    AsyncCheckpointer,
    CheckpointStuck,
    CheckpointUnreadable,
    read_checkpoint,
    write_best,
    write_checkpoint,
    write_model,
)
from ..storage.prepared import DataCache
from ..storage.rundir import FACTORY_PICKLE, MODEL_DIR, RunDir
from .fault_injection import FaultInjector
from .meter import FIRST_WINDOW, NOT_MEASURED, StepMeter
from .placement import apply_placement
from .reporter import Reporter
from .run_files import localise, open_run_files
from .trainer import Diverged, StepResult, Trainer

PLAN_POLL_S = 0.05
REDUCE_BYTES = 1 << 20  # smallest shared-memory reduction slot (evaluation sums fit)
ABANDON_AFTER_S = 1.0  # in a collective this long after the coordinator asked for a regroup: give up
# a worker still here this long after a SIGTERM/SIGINT exits anyway: what cannot be interrupted (a
# rendezvous, a collective, the state broadcast, an HTTP call) has bounds of its own, but longer ones
# (cluster.collective_timeout_s, the client's 10 s) than a user waits for a stop
LEAVE_DEADLINE_S = 10.0


class LeftUnheard(LeptonError):
    """The worker is leaving (a signal) and the coordinator cannot be told: it goes without a word."""


class GenerationOutcome(Enum):
    """How one generation ended for this worker (``Worker._run_generation``)."""

    FINISHED = "finished"  # trained to the end (or an early stop): the final phase ran
    PAUSED = "paused"  # paused after a step every rank agreed on, or a collective failed:
    # it reported the step it reached and waits for the next generation
    LEFT = "left"  # paused at an agreed step because this worker leaves the job


@dataclass
class _Throughput:
    """Samples, seconds and summed loss over a run of steps."""

    samples: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss * result.batch
        self.samples += result.batch
        self.seconds += result.wall_s

    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None


@dataclass
class _StepLoop:
    """What the step loop of one generation tracks between steps."""

    generation: Generation
    meter: StepMeter
    probe: Callable[[], float]  # a one-sample pass's cost, for the meter (balancing only)
    shares: list[float]
    plan_version: int = 0
    first_step: bool = True
    announced: bool = False  # the first full window at this plan was sent
    window: _Throughput = field(default_factory=_Throughput)  # since the last train record
    # the steady state: the first step of a generation (warm-up) is left out
    steady: _Throughput = field(default_factory=_Throughput)


class Worker:
    """One worker process. ``connect`` registers with the coordinator and builds the parts; the
    constructor takes them ready-made (tests hand it an in-process group and a fake client)."""

    def __init__(
        self,
        *,
        job: JobSpec,
        run: RunDir,
        trainer: Trainer,
        group: GenerationGroup,
        client: CoordinatorClient,
        reporter: Reporter,
        faults: FaultInjector,
        url: str = "",
    ):
        self.job = job
        self.run = run
        self.trainer = trainer
        self.group = group
        self.client = client
        self.reporter = reporter
        self.faults = faults
        self.url = url
        self.worker_id = reporter.worker_id
        self.group.should_abort = self._abandon_wait
        self.generation: int | None = None
        # set by the first SIGTERM/SIGINT; every poll and retry loop waits on it instead of sleeping
        self._leave = threading.Event()
        self._signum: int = signal.SIGTERM
        self.checkpointer: AsyncCheckpointer | None = None  # rank 0's background saves in a generation
        self.steady = _Throughput()  # the last generation's steady-state throughput

    @classmethod
    def connect(
        cls,
        url: str,
        token: str,
        cpus: list[int] | None = None,
        threads: int | None = None,
        connect_timeout_s: float = 120.0,
        run_files: str = "auto",
        ca: str | None = None,
    ) -> Worker:
        faults = FaultInjector()
        # before a generation a worker has no rank: these points match a local worker's index K instead
        local_index = int(os.environ.get("LEPTON_LOCAL_INDEX", "-1"))
        faults.fire("start", local_index)
        if os.environ.get("LEPTON_LOCAL_WORKER") == "1":  # Ctrl-C is the launcher's (_install_signals)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        # until serve() installs its handlers SIGTERM (and a remote worker's SIGINT) end the process
        # at once, whatever it waits for (the coordinator, the data loading): it has nothing to save
        client = CoordinatorClient(url, token, ca=ca)
        resources = apply_placement(cpus, threads)
        # the first optimizer pulls in ~800 modules (torch._dynamo; ~0.8 s): pay that before
        # registering, while a local coordinator is still preparing the data
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        where = urlparse(url)
        iface = data_plane_interface(cast(str, where.hostname), where.port or 0)
        request = RegisterRequest(
            host=socket.gethostname(),
            pid=os.getpid(),
            resources=resources,
            data_address=address_of(iface) if iface else None,
        )
        reg = client.register(request, wait_s=connect_timeout_s)
        # heartbeats start now; the coordinator counts this worker as available from its first plan
        # request, i.e. once the model and data below are ready
        reporter = Reporter(
            CoordinatorClient(url, token, credential=reg.credential, ca=ca),
            reg.worker_id,
            reg.heartbeat_interval_s,
        )
        # who it is, what it has: a restarted coordinator adopts running workers from their heartbeats
        reporter.update(host=socket.gethostname(), pid=os.getpid(), resources=resources.model_dump())
        reporter.start()
        faults.fire("registered", local_index)  # registered, not yet ready (the model and data load next)
        job = parse_job(reg.job, source="job from coordinator")
        run = open_run_files(reg, url, token, run_files, ca)  # a shared folder, a URL, or the coordinator
        localise(job, run)
        factory = None
        if reg.factory_pickle:
            import cloudpickle

            factory = cloudpickle.loads(cast(bytes, run.read_factory()))
        trainer = Trainer(job, DataCache(run), factory, _device(job))
        cluster = job.cluster
        group = GenerationGroup(
            cast(str, urlparse(url).hostname),  # registering over HTTP worked: the URL names a host
            reg.store_port,
            cluster.collective_timeout_s,
            shared_memory=cluster.shared_memory and trainer.device.type == "cpu",
            shm_capacity=max(REDUCE_BYTES, _max_flat_bytes(trainer)),
        )
        return cls(
            job=job,
            run=run,
            trainer=trainer,
            group=group,
            client=client,
            reporter=reporter,
            faults=faults,
            url=url,
        )

    # --- signals -------------------------------------------------------------------------------------
    @property
    def leaving(self) -> bool:
        return self._leave.is_set()

    @leaving.setter
    def leaving(self, value: bool) -> None:
        if value:
            self._leave.set()
        else:
            self._leave.clear()

    def _on_signal(self, signum, frame) -> None:
        """The Python-level handler: it must exist (the default action would kill the worker at once),
        but it runs only between bytecodes, so it may come late (while the main thread is inside a
        gloo call). ``_signal_arrived`` has acted already."""
        self._signum = signum
        self.leaving = True

    def _signal_arrived(self, signum: int, count: int) -> None:
        """Seen by the watcher thread as the signal arrives (``_watch_signals``). First SIGTERM/SIGINT:
        leave at the next step boundary (nothing redone), or at once when not training; in any case
        within LEAVE_DEADLINE_S of its arrival. Second: now."""
        if count > 1:
            os._exit(128 + signum)
        self._signum = signum
        self.leaving = True  # wakes every poll and retry loop that waits on the event
        timer = threading.Timer(LEAVE_DEADLINE_S, _exit_late, args=(signum,))
        timer.daemon = True
        timer.start()

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        # a worker started by `lepton train` shares the terminal's process group: Ctrl-C is the
        # launcher's to handle (checkpoint and stop the whole job), not a reason to leave
        local = os.environ.get("LEPTON_LOCAL_WORKER") == "1"
        signal.signal(signal.SIGINT, signal.SIG_IGN if local else self._on_signal)
        self._watch_signals({signal.SIGTERM} if local else {signal.SIGTERM, signal.SIGINT})

    def _watch_signals(self, leave_on: set[int]) -> None:
        """Python's C-level handler writes each signal's number to the wakeup fd the moment it arrives,
        whatever the main thread is doing; a thread reading it starts the leave deadline then, not when
        the Python handler gets to run."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

        def watch() -> None:
            seen = 0
            while True:
                for signum in os.read(r, 64):
                    if signum in leave_on:
                        seen += 1
                        self._signal_arrived(signum, seen)

        threading.Thread(target=watch, name="lepton-signals", daemon=True).start()

    # --- lifecycle -----------------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until the coordinator says exit (or this worker leaves). Returns the exit code."""
        self._install_signals()
        try:
            return self._serve()
        except LeftUnheard as e:
            name = signal.Signals(self._signum).name
            print(f"lepton worker: left on {name} without telling the coordinator ({e})", file=sys.stderr)
            return 128 + self._signum

    def _serve(self) -> int:
        try:
            while not self.reporter.exit_requested.is_set():
                if self.leaving:
                    self._send("paused", {"reason": "leaving", "generation": None, "step": self.trainer.step})
                    break
                plan = self._control(self.client.plan, self.worker_id)
                if plan.action == "exit":
                    break
                if plan.action == "wait":
                    self._leave.wait(PLAN_POLL_S)
                elif plan.action == "checkpoint":
                    self._checkpoints_written()
                    trainer = self.trainer
                    path = write_checkpoint(self.run, trainer.step, trainer.state(), self.job.checkpoint.keep)
                    self._send("checkpoint", {"step": trainer.step, "path": str(path)})
                elif self._run_generation(plan.generation) is GenerationOutcome.LEFT:
                    break
        except LeptonError:
            raise  # the coordinator is gone: nobody to tell
        except (
            Diverged,
            CheckpointUnreadable,
            CheckpointStuck,
            Unreachable,
        ) as e:  # a clear cause: no traceback
            self._send("failed", {"error": str(e) or type(e).__name__, "generation": self.generation})
            print(f"lepton worker: {e}", file=sys.stderr)
            return 1
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            self._send(
                "failed", {"error": error, "trace": traceback.format_exc(), "generation": self.generation}
            )
            raise
        finally:
            self.reporter.close()
            self.group.leave()
        return 0

    def _run_generation(self, gen: Generation) -> GenerationOutcome:
        """Join generation ``gen``, train in it, and tell the coordinator how it ended."""
        self.generation = gen.id
        self.reporter.update(
            state="training",
            generation=gen.id,
            step=gen.start_step,
            rank=gen.rank,
            world=gen.world,
            plan_version=0,
            shares=list(gen.shares),
            **NOT_MEASURED,
        )
        try:
            self.group.join(gen.id, gen.rank, gen.world, gen.store_port, gen.backend)
            outcome = self._train_steps(gen)
            summary = self._finish_run(gen) if outcome is GenerationOutcome.FINISHED else None
        except CommError as e:
            self.group.leave()
            # a background save may still be writing: the coordinator, hearing of the pause, may ask
            # for a checkpoint of this very step, and two writers of one folder corrupt it
            self._checkpoints_written()
            self.reporter.update(state="paused")
            self._send(
                "paused",
                {
                    "reason": "collective_error",
                    "generation": gen.id,
                    "step": self.trainer.step,
                    "error": str(e)[:300],
                },
            )
            return GenerationOutcome.PAUSED
        self.group.leave()
        if outcome is GenerationOutcome.PAUSED:  # at an agreed step boundary
            self.reporter.update(state="paused")
            why = "leaving" if self.leaving else "regroup"
            self._send("paused", {"reason": why, "generation": gen.id, "step": self.trainer.step})
            return GenerationOutcome.LEFT if self.leaving else GenerationOutcome.PAUSED
        self.reporter.update(state="finished", step=self.trainer.step)
        self._send("finished", {"summary": summary, "step": self.trainer.step, "generation": gen.id})
        return GenerationOutcome.FINISHED

    def _control(self, fn, *args):
        """A control-plane call that rides out a coordinator outage of up to coordinator_timeout_s."""
        deadline = time.monotonic() + self.job.cluster.coordinator_timeout_s
        while True:
            try:
                return fn(*args)
            except CoordinatorUnreachable:
                if self.leaving:  # riding out the outage would ignore the signal
                    raise LeftUnheard(f"unreachable at {self.url}") from None
                if time.monotonic() > deadline:
                    raise LeptonError(
                        f"lost the coordinator at {self.url} for more than "
                        f"{self.job.cluster.coordinator_timeout_s:g} s"
                    ) from None
                self._leave.wait(0.5)

    def _send(self, kind: str, payload: dict) -> None:
        self.reporter.flush()  # a heartbeat first: a restarted coordinator adopts us before the report
        self._control(self.client.report, Report(worker_id=self.worker_id, kind=kind, payload=payload))

    # --- one generation ------------------------------------------------------------------------------
    def _abandon_wait(self, waited_s: float) -> bool:
        """A shared-memory collective gives up when the coordinator ended this generation and the
        wait is longer than any healthy peer needs (a hung peer); gloo would wait its full timeout."""
        return waited_s > ABANDON_AFTER_S and self.reporter.regroup_generation == self.generation

    def _wants_regroup(self) -> bool:
        return (
            self.leaving
            or self.reporter.regroup_generation == self.generation
            or self.reporter.exit_requested.is_set()
        )

    def _train_steps(self, gen: Generation) -> GenerationOutcome:
        """Train from the broadcast state to the end (FINISHED) or to a step boundary every rank
        agreed to pause at (PAUSED). A failed collective raises ``CommError``."""
        trainer, rank = self.trainer, gen.rank
        self._receive_state(gen)
        loop = self._start_loop(gen)
        if self._eval_due() and trainer.evaluated_step < trainer.step < trainer.total_steps:
            self._validate(rank, gen.id)  # a validation interrupted by the last failure
        while trainer.step < trainer.total_steps and not trainer.stopped_early:
            loop.meter.begin()
            self.faults.fire("step", rank, trainer.step, gen.id)
            result = trainer.train_step(
                self.group, loop.shares, rank, regroup=self._wants_regroup(), next_plan=self._next_plan(loop)
            )
            loop.meter.record(result.local, result.compute_s, result.compute_cpu_s, result.overhead_s)
            self._account_step(loop, result)
            self._checkpoint_and_validate(loop)
            if result.regroup and trainer.step < trainer.total_steps and not trainer.stopped_early:
                if self.checkpointer:
                    self.checkpointer.wait()
                return GenerationOutcome.PAUSED
        if self.checkpointer:
            self.checkpointer.wait()
        self.steady = loop.steady
        return GenerationOutcome.FINISHED

    def _receive_state(self, gen: Generation) -> None:
        """Every rank starts from rank 0's state (its own, or the checkpoint it resumes from)."""
        trainer, rank = self.trainer, gen.rank
        if rank == 0 and gen.resume_checkpoint:
            resume = self.run.relative(gen.resume_checkpoint)
            trainer.load_state(read_checkpoint(resume, storage=self.run.storage))
        self.faults.fire("broadcast", rank, trainer.step, gen.id)
        state = self.group.broadcast_state(trainer.state() if rank == 0 else None, src=0)
        if rank != 0:
            trainer.load_state(state)
        self.checkpointer = (
            AsyncCheckpointer(self.run, self.job.checkpoint.keep, self._on_checkpoint) if rank == 0 else None
        )

    def _start_loop(self, gen: Generation) -> _StepLoop:
        trainer, job, rank = self.trainer, self.job, gen.rank
        self.reporter.plan = None
        if self.faults.has("throttle"):
            trainer.compute_hook = lambda samples: self.faults.throttle(rank, samples, trainer.step)
        if self.faults.has("nan"):
            trainer.poison = lambda step: self.faults.poisoned(rank, step)
        # the probe and the short first window serve the balancer only: not when shares are equal or fixed
        balancing = job.cluster.balance == "on" and job.cluster.fixed_shares(gen.world) is None
        meter = StepMeter(
            on_gpu=trainer.device.type == "cuda", first_window=FIRST_WINDOW if balancing else None
        )
        probe = trainer.probe_fixed_cost if balancing else (lambda: 0.0)
        return _StepLoop(generation=gen, meter=meter, probe=probe, shares=list(gen.shares))

    def _next_plan(self, loop: _StepLoop) -> list[float] | None:
        """The shares of plan version v+1, if the coordinator sent it for this generation (a plan from
        an earlier generation is never applied)."""
        pending: StepPlan | None = self.reporter.plan
        if pending is None or pending.generation != loop.generation.id:
            return None
        return pending.shares if pending.version == loop.plan_version + 1 else None

    def _account_step(self, loop: _StepLoop, result: StepResult) -> None:
        """After a step: its records, the plan it agreed on, the meter and the heartbeat fields."""
        trainer, meter, gen = self.trainer, loop.meter, loop.generation
        lead = gen.rank == 0  # rank 0 writes the records
        if result.skipped and lead:
            self.reporter.push(SkippedStepRecord(step=trainer.step - 1, lr_scale=trainer.lr_scale))
        if result.next_shares is not None:  # plan v+1 reached every rank in this step's reduction
            loop.shares, loop.plan_version = result.next_shares, loop.plan_version + 1
            # together: the fields of a measurement never mix two plans
            self.reporter.update(shares=loop.shares, plan_version=loop.plan_version, **NOT_MEASURED)
            if lead:
                self.reporter.push(
                    PlanRecord(
                        step=trainer.step,
                        version=loop.plan_version,
                        shares=[round(share, 6) for share in loop.shares],
                    )
                )
            meter.reset()
            meter.compute_fixed = loop.probe()  # in a step the meter leaves out
            loop.announced = False
        if loop.first_step and lead:  # when a generation's first step completed (recovery time)
            self.reporter.push(
                GenerationFirstStepRecord(
                    generation=gen.id, step=trainer.step, transport=self.group.transport
                )
            )
        if loop.first_step:  # the first step of a generation warms up: left out
            meter.discard()
            meter.compute_fixed = loop.probe()
        else:
            loop.steady.samples += result.batch
            loop.steady.seconds += result.wall_s
        loop.first_step = False
        loop.window.add(result)
        self.reporter.update(step=trainer.step, plan_version=loop.plan_version, **meter.fields())
        # the balancer uses full windows only: the first one at a plan goes out at once, not at the
        # next beat (while a plan is unsettled, the next re-plan waits for every member's)
        if meter.full and not loop.announced:
            self.reporter.beat_now()
            loop.announced = True
        log_now = trainer.step % self.job.train.log_every_steps == 0 or trainer.step == trainer.total_steps
        if lead and log_now:
            window = loop.window
            self.reporter.push(
                TrainRecord(
                    step=trainer.step,
                    epoch=trainer.epoch,
                    total_steps=trainer.total_steps,
                    loss=window.loss_sum / window.samples,
                    lr=trainer.lr_at(trainer.step - 1),
                    samples_per_s=window.samples_per_s(),
                    generation=gen.id,
                    workers=gen.world,
                )
            )
            loop.window = _Throughput()

    def _checkpoint_and_validate(self, loop: _StepLoop) -> None:
        trainer, gen = self.trainer, loop.generation
        every = self.job.checkpoint.every_steps
        if self.checkpointer and every and trainer.step % every == 0 and trainer.step < trainer.total_steps:
            self.checkpointer.save(trainer.step, trainer.state())
            self.faults.fire("checkpoint", gen.rank, trainer.step, gen.id)
            loop.meter.discard()
        if self._eval_due() and trainer.step < trainer.total_steps:
            self._validate(gen.rank, gen.id)  # may stop early: the final phase then starts now
            loop.meter.discard()

    def _finish_run(self, gen: Generation) -> dict | None:
        """The final phase, a collective: keep-best's model, the final evaluations; rank 0 writes the
        last checkpoint and the model, and returns the run's summary (None elsewhere)."""
        trainer, job, rank = self.trainer, self.job, gen.rank
        if job.policies.keep_best and trainer.evaluated_step < trainer.step:
            # the final weights compete too: the last periodic validation came before them (there is
            # none at the last step), and without this a run that ran to its end always lost them
            self._keep_if_best(trainer.evaluate(self.group, "val"), rank)
        if job.policies.keep_best and trainer.best_step is not None and trainer.best_step != trainer.step:
            best = read_checkpoint(self.run.best_rel, storage=self.run.storage) if rank == 0 else None
            trainer.model.load_state_dict(self.group.broadcast_state(best, src=0)["model"])
        agree = trainer.replicas_agree(self.group)
        results = {
            split: trainer.evaluate(self.group, split, confusion=True) for split in ("train", "val", "test")
        }
        if job.eval.every != "never":
            self._log_eval("val", results["val"], rank)
        if rank != 0:
            return None
        self._log_eval("test", results["test"], rank)
        path = write_checkpoint(self.run, trainer.step, trainer.state(), job.checkpoint.keep)
        self._on_checkpoint(trainer.step, path)
        self._write_model(results)
        steady = self.steady.samples_per_s()
        # epochs: completed ones (fewer than planned after an early stop)
        return {
            **results,
            "steps": trainer.step,
            "epochs": trainer.epoch,
            "epochs_planned": job.train.epochs,
            "replicas_agree": agree,
            "stopped_early": trainer.stopped_early,
            "best_step": trainer.best_step,
            "samples_per_s": round(steady, 1) if steady is not None else None,
        }

    def _eval_due(self) -> bool:
        every, trainer = self.job.eval.every, self.trainer
        return trainer.step > 0 and (
            (every == "epoch" and trainer.at_epoch_end())
            or (isinstance(every, int) and trainer.step % every == 0)
        )

    def _validate(self, rank: int, generation: int) -> None:
        """A periodic validation and the policies' decisions on it."""
        trainer = self.trainer
        self.faults.fire("eval", rank, trainer.step, generation)
        scores = trainer.evaluate(self.group, "val")
        self._log_eval("val", scores, rank)
        decisions = trainer.decide(scores)
        if rank == 0:
            for decision in decisions:
                self.reporter.push(_decision_record(decision, trainer.step, trainer.lr_at(trainer.step)))
        self._keep_if_best(scores, rank)
        trainer.evaluated_step = trainer.step

    def _keep_if_best(self, scores: dict, rank: int) -> None:
        """Keep-best: the validation ``scores`` are the best so far → rank 0 keeps this model. Every
        rank sees the same reduced metrics, so every rank answers the same."""
        trainer = self.trainer
        if trainer.improved(scores) and rank == 0:
            best = {"model": trainer.model.state_dict(), "step": trainer.step}
            write_best(self.run, trainer.step, best)
            # improved(): keep_best is on and this validation's value is the best
            kb = cast(KeepBestSpec, self.job.policies.keep_best)
            self.reporter.push(
                BestRecord(step=trainer.step, value=cast(float, trainer.best_value), metric=kb.metric)
            )

    def _log_eval(self, split: str, scores: dict, rank: int) -> None:
        if rank == 0 and scores.get("count"):
            self.reporter.push(
                EvalRecord(split=split, step=self.trainer.step, epoch=self.trainer.epoch, metrics=scores)
            )

    def _checkpoints_written(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()
            self.checkpointer = None

    def _on_checkpoint(self, step: int, path: Path | str) -> None:
        self._send("checkpoint", {"step": step, "path": str(path)})

    def _write_model(self, results: dict) -> None:
        pre = self.trainer.cache.preprocessor
        extra = {}
        if self.run.storage.exists(FACTORY_PICKLE):
            extra[FACTORY_PICKLE] = self.run.storage.local_path(FACTORY_PICKLE)
        meta = {
            "format": "lepton-model/1",
            "name": self.job.name,
            "task": self.job.task,
            "model": self.job.to_yaml_dict()["model"],
            "seed": self.job.seed,
            "input_shape": list(pre.input_shape),
            "classes": pre.classes,
            "preprocess": pre.to_dict(),
            "metrics": results,
            "step": self.trainer.step,
            "best_step": self.trainer.best_step,
        }
        write_model(MODEL_DIR, self.trainer.model.state_dict(), meta, extra, storage=self.run.storage)


def _exit_late(signum: int) -> None:
    """The leave deadline passed (``Worker._on_signal``): exit now, saying so."""
    name = signal.Signals(signum).name
    print(
        f"lepton worker: still here {LEAVE_DEADLINE_S:g} s after {name}: exiting now",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


def _decision_record(decision: Decision, step: int, lr: float) -> DecisionRecord:
    return DecisionRecord(
        decision="early_stop" if decision.kind == "finish" else "lr",
        step=step,
        reason=decision.reason,
        details=decision.details,
        lr=lr,
    )


def _device(job: JobSpec) -> torch.device:
    want = job.cluster.device
    if want == "cuda" and not torch.cuda.is_available():
        raise LeptonError("cluster.device is 'cuda' but this worker sees no GPU (or torch has no CUDA)")
    if want != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(0)  # the launcher gives each local worker its own GPU as device 0
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _max_flat_bytes(trainer: Trainer) -> int:
    """The largest gradient buffer a step reduces: the gradients and the extra slots, which grow by
    one per rank of the generation (the next plan's shares; worker/step_control.py)."""
    flat = trainer.grads.flat
    return flat.nbytes + MAX_WORLD * flat.element_size()


def run_worker(
    url: str,
    token: str,
    cpus: list[int] | None = None,
    threads: int | None = None,
    connect_timeout_s: float = 120.0,
    run_files: str = "auto",
    ca: str | None = None,
) -> int:
    return Worker.connect(url, token, cpus, threads, connect_timeout_s, run_files, ca).serve()
