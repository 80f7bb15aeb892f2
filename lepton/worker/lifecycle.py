"""``lepton worker``: the worker lifecycle.

register → wait for a generation → join its process group → receive the state by broadcast from
rank 0 → train → on a collective error, a regroup flag or a leave request: pause, report the step,
and wait for the next generation. The training loop talks to the coordinator only through a
background ``Reporter`` (heartbeats, metric records) so that no step ever waits on HTTP; it looks at
the plan only between generations. If the coordinator is unreachable, the data plane goes on and
control calls are retried for ``cluster.coordinator_timeout_s``.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..client import CoordinatorClient, CoordinatorUnreachable
from ..comm import CommError, GenerationGroup
from ..comm.shm import MAX_WORLD
from ..errors import LeptonError
from ..protocol import Generation, RegisterRequest, Report
from ..spec import parse_job
from ..storage.checkpoint import (AsyncCheckpointer, CheckpointUnreadable, read_checkpoint, write_checkpoint,
                                  write_model, write_state_dir)
from ..storage.prepared import DataCache
from ..storage.rundir import RunDir
from .fault_injection import FaultInjector
from .meter import FIRST_WINDOW, NOT_MEASURED, StepMeter
from .placement import apply_placement
from .reporter import Reporter
from .trainer import Diverged, Trainer

PLAN_POLL_S = 0.05
REDUCE_BYTES = 1 << 20    # smallest shared-memory reduction slot (evaluation sums fit)
ABANDON_AFTER_S = 1.0     # in a collective this long after the coordinator asked for a regroup: give up


class Worker:
    def __init__(self, url: str, token: str, cpus: list[int] | None = None, threads: int | None = None,
                 connect_timeout_s: float = 120.0):
        self.faults = FaultInjector()
        self.faults.fire("start")
        self.url = url
        self.client = CoordinatorClient(url, token)
        resources = apply_placement(cpus, threads)
        # the first optimizer pulls in ~800 modules (torch._dynamo; ~0.8 s): pay that before
        # registering, while a local coordinator is still preparing the data
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        reg = self.client.register(RegisterRequest(host=socket.gethostname(), pid=os.getpid(), resources=resources),
                                   wait_s=connect_timeout_s)
        self.worker_id = reg.worker_id
        # heartbeats start now; the coordinator counts this worker as available from its first plan
        # request, i.e. once the model and data below are ready
        self.reporter = Reporter(CoordinatorClient(url, token), self.worker_id, reg.heartbeat_interval_s)
        # who it is, what it has: a restarted coordinator adopts running workers from their heartbeats
        self.reporter.update(host=socket.gethostname(), pid=os.getpid(), resources=resources.model_dump())
        self.reporter.start()
        self.job = parse_job(reg.job, source="job from coordinator")
        self.run = RunDir(reg.run_dir)
        factory = None
        if reg.factory_pickle:
            import cloudpickle
            factory = cloudpickle.loads(Path(reg.factory_pickle).read_bytes())
        self.trainer = Trainer(self.job, DataCache(self.run), factory, self._device())
        cluster = self.job.cluster
        self.group = GenerationGroup(urlparse(url).hostname, reg.store_port, cluster.collective_timeout_s,
                                     shared_memory=cluster.shared_memory and self.trainer.device.type == "cpu",
                                     shm_capacity=max(REDUCE_BYTES, self._max_flat_bytes()))
        self.group.should_abort = self._abandon_wait
        self.generation: int | None = None
        self.leaving = False
        self.checkpointer: AsyncCheckpointer | None = None   # rank 0's background saves in a generation

    def _max_flat_bytes(self) -> int:
        """The largest gradient buffer a step reduces: the gradients and the extra slots, which grow
        by one per rank of the generation (the next plan's shares; ``Trainer.train_step``)."""
        flat = self.trainer.grads.flat
        return flat.nbytes + MAX_WORLD * flat.element_size()

    def _device(self) -> torch.device:
        want = self.job.cluster.device
        if want == "cuda" and not torch.cuda.is_available():
            raise LeptonError("cluster.device is 'cuda' but this worker sees no GPU (or torch has no CUDA)")
        if want != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(0)          # the launcher gives each local worker its own GPU as device 0
            return torch.device("cuda", 0)
        return torch.device("cpu")

    # --- signals -------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """First SIGTERM/SIGINT: leave at the next step boundary (nothing redone). Second: now."""
        if self.leaving:
            os._exit(128 + signum)
        self.leaving = True

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        # a worker started by `lepton train` shares the terminal's process group: Ctrl-C is the
        # launcher's to handle (checkpoint and stop the whole job), not a reason to leave
        local = os.environ.get("LEPTON_LOCAL_WORKER") == "1"
        signal.signal(signal.SIGINT, signal.SIG_IGN if local else self._on_signal)

    # --- lifecycle -----------------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until the coordinator says exit (or this worker leaves). Returns the exit code."""
        self._install_signals()
        try:
            while not self.reporter.exit_requested.is_set():
                if self.leaving:
                    self._send("paused", {"reason": "leaving", "step": self.trainer.step})
                    break
                plan = self._control(self.client.plan, self.worker_id)
                if plan.action == "exit":
                    break
                if plan.action == "wait":
                    time.sleep(PLAN_POLL_S)
                elif plan.action == "checkpoint":
                    self._checkpoints_written()
                    t = self.trainer
                    path = write_checkpoint(self.run, t.step, t.state(), self.job.checkpoint.keep)
                    self._send("checkpoint", {"step": t.step, "path": str(path)})
                elif self._run_generation(plan.generation) == "left":
                    break
        except LeptonError:
            raise                                 # the coordinator is gone: nobody to tell
        except (Diverged, CheckpointUnreadable) as e:   # a clear cause: report it, no traceback
            self._send("failed", {"error": str(e)})
            return 1
        except Exception as e:
            self._send("failed", {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
            raise
        finally:
            self.reporter.close()
            self.group.leave()
        return 0

    def _run_generation(self, gen: Generation) -> str:
        self.generation = gen.id
        self.reporter.update(state="training", generation=gen.id, step=gen.start_step, rank=gen.rank, world=gen.world,
                             plan_version=0, shares=list(gen.shares), **NOT_MEASURED)
        try:
            self.group.join(gen.id, gen.rank, gen.world, gen.store_port, gen.backend)
            summary = self._train(gen)
        except CommError as e:
            self.group.leave()
            # a background save may still be writing: the coordinator, hearing of the pause, may ask
            # for a checkpoint of this very step, and two writers of one folder corrupt it
            self._checkpoints_written()
            self.reporter.update(state="paused")
            self._send("paused", {"reason": "collective_error", "generation": gen.id, "step": self.trainer.step,
                                  "error": str(e)[:300]})
            return "paused"
        self.group.leave()
        if summary is False:                      # paused at an agreed step boundary
            self.reporter.update(state="paused")
            why = "leaving" if self.leaving else "regroup"
            self._send("paused", {"reason": why, "generation": gen.id, "step": self.trainer.step})
            return "left" if self.leaving else "paused"
        self.reporter.update(state="finished", step=self.trainer.step)
        self._send("finished", {"summary": summary, "step": self.trainer.step})
        return "finished"

    def _control(self, fn, *args):
        """A control-plane call that rides out a coordinator outage of up to coordinator_timeout_s."""
        deadline = time.monotonic() + self.job.cluster.coordinator_timeout_s
        while True:
            try:
                return fn(*args)
            except CoordinatorUnreachable:
                if time.monotonic() > deadline:
                    raise LeptonError(f"lost the coordinator at {self.url} for more than "
                                      f"{self.job.cluster.coordinator_timeout_s:g} s") from None
                time.sleep(0.5)

    def _send(self, kind: str, payload: dict) -> None:
        self.reporter.flush()      # a heartbeat first: a restarted coordinator adopts us before the report
        self._control(self.client.report, Report(worker_id=self.worker_id, kind=kind, payload=payload))

    # --- one generation ------------------------------------------------------------------------------
    def _abandon_wait(self, waited_s: float) -> bool:
        """A shared-memory collective gives up when the coordinator ended this generation and the
        wait is longer than any healthy peer needs (a hung peer); gloo would wait its full timeout."""
        return waited_s > ABANDON_AFTER_S and self.reporter.regroup_generation == self.generation

    def _wants_regroup(self) -> bool:
        return (self.leaving or self.reporter.regroup_generation == self.generation
                or self.reporter.exit_requested.is_set())

    def _train(self, gen: Generation) -> dict | None | bool:
        """Train from the broadcast state to the end (→ summary on rank 0, None elsewhere) or to an
        agreed pause (→ False)."""
        t, job, rank = self.trainer, self.job, gen.rank
        if rank == 0 and gen.resume_checkpoint:
            t.load_state(read_checkpoint(gen.resume_checkpoint))
        state = self.group.broadcast_state(t.state() if rank == 0 else None, src=0)
        if rank != 0:
            t.load_state(state)
        ckpt = self.checkpointer = (AsyncCheckpointer(self.run, job.checkpoint.keep, self._on_checkpoint)
                                    if rank == 0 else None)
        shares, plan_version = list(gen.shares), 0
        self.reporter.plan = None
        if self.faults.has("throttle"):
            t.compute_hook = lambda n: self.faults.throttle(rank, n)
        if self.faults.has("nan"):
            t.poison = lambda step: self.faults.poisoned(rank, step)
        # the probe and the short first window serve the balancer only: not when shares are equal or fixed
        balancing = job.cluster.balance == "on" and job.cluster.fixed_shares(gen.world) is None
        meter = StepMeter(on_gpu=t.device.type == "cuda", first_window=FIRST_WINDOW if balancing else None)
        probe = t.probe_fixed_cost if balancing else (lambda: 0.0)
        every, log_every = job.checkpoint.every_steps, job.train.log_every_steps
        if self._eval_due() and t.evaluated_step < t.step < t.total_steps:
            self._validate(rank, gen.id)          # a validation interrupted by the last failure
        # throughput over the steady state: the first step of a generation (warm-up) is left out
        steady_samples, steady_s = 0, 0.0
        win_loss, win_samples, win_s = 0.0, 0, 0.0
        first = True
        announced = False                         # the first full window at this plan was sent
        while t.step < t.total_steps and not t.stopped_early:
            meter.begin()
            self.faults.fire("step", rank, t.step, gen.id)
            pending = self.reporter.plan          # a plan from an earlier generation is never applied
            known = (pending.shares if pending is not None and pending.generation == gen.id
                     and pending.version == plan_version + 1 else None)
            r = t.train_step(self.group, shares, rank, regroup=self._wants_regroup(), next_plan=known)
            meter.record(r.local, r.compute_s, r.compute_cpu_s, r.overhead_s)
            if r.skipped and rank == 0:
                self.reporter.push({"kind": "skipped_step", "time": time.time(), "step": t.step - 1,
                                    "lr_scale": t.lr_scale, "reason": "non-finite loss or gradient"})
            if r.next_shares is not None:         # plan v+1 reached every rank in this step's reduction
                shares, plan_version = r.next_shares, plan_version + 1
                self.reporter.update(shares=shares, plan_version=plan_version, **NOT_MEASURED)   # together
                if rank == 0:
                    self.reporter.push({"kind": "plan", "time": time.time(), "step": t.step,
                                        "version": plan_version, "shares": [round(x, 6) for x in shares]})
                meter.reset()
                meter.compute_fixed = probe()     # in a step the meter leaves out
                announced = False
            if first and rank == 0:     # when a generation's first step completed (recovery time)
                self.reporter.push({"kind": "generation_first_step", "generation": gen.id, "step": t.step,
                                    "time": time.time(), "transport": self.group.transport})
            if first:                             # the first step of a generation warms up: left out
                meter.discard()
                meter.compute_fixed = probe()
            else:
                steady_samples += r.batch
                steady_s += r.wall_s
            first = False
            win_loss += r.loss * r.batch
            win_samples += r.batch
            win_s += r.wall_s
            self.reporter.update(step=t.step, plan_version=plan_version, **meter.fields())
            # the balancer uses full windows only: the first one at a plan goes out at once, not at the
            # next beat (while a plan is unsettled, the next re-plan waits for every member's)
            if meter.full and not announced:
                self.reporter.beat_now()
                announced = True
            if rank == 0 and (t.step % log_every == 0 or t.step == t.total_steps):
                self.reporter.push({"kind": "train", "time": time.time(), "step": t.step, "epoch": t.epoch,
                                    "total_steps": t.total_steps, "loss": win_loss / win_samples,
                                    "lr": t.lr_at(t.step - 1),
                                    "samples_per_s": win_samples / win_s if win_s > 0 else None,
                                    "generation": gen.id, "workers": gen.world})
                win_loss, win_samples, win_s = 0.0, 0, 0.0
            if ckpt and every and t.step % every == 0 and t.step < t.total_steps:
                ckpt.save(t.step, t.state())
                self.faults.fire("checkpoint", rank, t.step, gen.id)
                meter.discard()
            if self._eval_due() and t.step < t.total_steps:
                self._validate(rank, gen.id)      # may stop early: the final phase then starts now
                meter.discard()
            if r.regroup and t.step < t.total_steps and not t.stopped_early:
                if ckpt:
                    ckpt.wait()
                return False
        if ckpt:
            ckpt.wait()
        if job.policies.keep_best and t.evaluated_step < t.step:
            # the final weights compete too: the last periodic validation came before them (there is
            # none at the last step), and without this a run that ran to its end always lost them
            self._keep_if_best(t.evaluate(self.group, "val"), rank)
        if job.policies.keep_best and t.best_step is not None and t.best_step != t.step:
            best = read_checkpoint(self.run.best_dir) if rank == 0 else None
            t.model.load_state_dict(self.group.broadcast_state(best, src=0)["model"])
        agree = t.replicas_agree(self.group)
        results = {split: t.evaluate(self.group, split, confusion=True) for split in ("train", "val", "test")}
        if job.eval.every != "never":
            self._log_eval("val", results["val"], rank)
        if rank != 0:
            return None
        self._log_eval("test", results["test"], rank)
        path = write_checkpoint(self.run, t.step, t.state(), job.checkpoint.keep)
        self._on_checkpoint(t.step, path)
        self._write_model(results)
        # epochs: completed ones (fewer than planned after an early stop)
        return {**results, "steps": t.step, "epochs": t.epoch, "epochs_planned": job.train.epochs,
                "replicas_agree": agree, "stopped_early": t.stopped_early, "best_step": t.best_step,
                "samples_per_s": round(steady_samples / steady_s, 1) if steady_s > 0 else None}

    def _eval_due(self) -> bool:
        every, t = self.job.eval.every, self.trainer
        return t.step > 0 and ((every == "epoch" and t.at_epoch_end()) or (isinstance(every, int) and t.step % every == 0))

    def _validate(self, rank: int, generation: int) -> None:
        """A periodic validation and the policies' decisions on it."""
        t = self.trainer
        self.faults.fire("eval", rank, t.step, generation)
        m = t.evaluate(self.group, "val")
        self._log_eval("val", m, rank)
        decisions = t.decide(m)
        if rank == 0:
            for d in decisions:
                self.reporter.push({"kind": "decision", "decision": "early_stop" if d.kind == "finish" else "lr",
                                    "time": time.time(), "step": t.step, "reason": d.reason, "details": d.details,
                                    "lr": t.lr_at(t.step)})
        self._keep_if_best(m, rank)
        t.evaluated_step = t.step

    def _keep_if_best(self, m: dict, rank: int) -> None:
        """Keep-best: the validation ``m`` is the best so far → rank 0 keeps this model. Every rank
        sees the same reduced metrics, so every rank answers the same."""
        t = self.trainer
        if t.improved(m) and rank == 0:
            write_state_dir(self.run.best_dir, t.step, {"model": t.model.state_dict(), "step": t.step})
            self.reporter.push({"kind": "best", "time": time.time(), "step": t.step, "value": t.best_value,
                                "metric": self.job.policies.keep_best.metric})

    def _log_eval(self, split: str, m: dict, rank: int) -> None:
        if rank == 0 and m.get("count"):
            self.reporter.push({"kind": "eval", "split": split, "time": time.time(), "step": self.trainer.step,
                                "epoch": self.trainer.epoch, **m})

    def _checkpoints_written(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()
            self.checkpointer = None

    def _on_checkpoint(self, step: int, path: Path) -> None:
        self._send("checkpoint", {"step": step, "path": str(path)})

    def _write_model(self, results: dict) -> None:
        pre = self.trainer.cache.preprocessor
        extra = {}
        if self.run.factory_pickle.exists():
            extra["model_factory.pkl"] = self.run.factory_pickle
        meta = {"format": "lepton-model/1", "name": self.job.name, "task": self.job.task,
                "model": self.job.to_yaml_dict()["model"], "seed": self.job.seed,
                "input_shape": list(pre.input_shape), "classes": pre.classes, "preprocess": pre.to_dict(),
                "metrics": results, "step": self.trainer.step, "best_step": self.trainer.best_step}
        write_model(self.run.model_dir, self.trainer.model.state_dict(), meta, extra)


def run_worker(url: str, token: str, cpus: list[int] | None = None, threads: int | None = None,
               connect_timeout_s: float = 120.0) -> int:
    return Worker(url, token, cpus, threads, connect_timeout_s).serve()
