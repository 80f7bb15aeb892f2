"""``lepton worker``: register, wait for a generation, train, report; the worker lifecycle of design §3.

The training loop talks to the coordinator only through a background ``Reporter`` (heartbeats and
metric records) so that no step ever waits on HTTP; it looks at the plan only between generations.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..client import CoordinatorClient
from ..comm import CommError, GenerationGroup
from ..errors import LeptonError
from ..protocol import Generation, Heartbeat, RegisterRequest, Report, Resources
from ..spec import parse_job
from ..storage.checkpoint import AsyncCheckpointer, read_checkpoint, write_checkpoint, write_model
from ..storage.prepared import DataCache
from ..storage.rundir import RunDir
from .faults import FaultInjector
from .trainer import Trainer

PLAN_POLL_S = 0.05


class Reporter(threading.Thread):
    """Sends heartbeats and queued metric records every ``interval`` seconds, off the training path.
    A coordinator that is briefly unreachable only delays the records; they are kept and resent."""

    def __init__(self, client: CoordinatorClient, worker_id: str, interval: float):
        super().__init__(name="lepton-reporter", daemon=True)
        self.client, self.worker_id, self.interval = client, worker_id, interval
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.beat = Heartbeat(worker_id=worker_id, state="waiting")
        self.exit_requested = threading.Event()
        self._closing = threading.Event()

    def update(self, **fields) -> None:
        with self.lock:
            self.beat = self.beat.model_copy(update=fields)

    def push(self, record: dict) -> None:
        with self.lock:
            self.records.append(record)

    def flush(self) -> None:
        with self.lock:
            records, self.records = self.records, []
            beat = self.beat
        try:
            if records:
                self.client.report(Report(worker_id=self.worker_id, kind="metrics", payload={"records": records}))
            if self.client.heartbeat(beat).action == "exit":
                self.exit_requested.set()
        except LeptonError:
            with self.lock:
                self.records = records + self.records

    def run(self) -> None:
        while not self._closing.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=5)
        self.flush()


def _apply_placement(cpus: list[int] | None, threads: int | None) -> Resources:
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    usable = len(os.sched_getaffinity(0))
    n_threads = threads or usable
    torch.set_num_threads(n_threads)
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 0.0
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return Resources(cpus=usable, threads=n_threads, gpus=gpus, memory_gb=round(mem_gb, 1))


class Worker:
    def __init__(self, url: str, token: str, cpus: list[int] | None = None, threads: int | None = None,
                 connect_timeout_s: float = 120.0):
        self.url = url
        self.client = CoordinatorClient(url, token)
        resources = _apply_placement(cpus, threads)
        reg = self.client.register(RegisterRequest(host=socket.gethostname(), pid=os.getpid(), resources=resources),
                                   wait_s=connect_timeout_s)
        self.worker_id = reg.worker_id
        self.job = parse_job(reg.job, source="job from coordinator")
        self.run = RunDir(reg.run_dir)
        factory = None
        if reg.factory_pickle:
            import cloudpickle
            factory = cloudpickle.loads(Path(reg.factory_pickle).read_bytes())
        self.trainer = Trainer(self.job, DataCache(self.run), factory)
        self.group = GenerationGroup(urlparse(url).hostname, reg.store_port, self.job.cluster.collective_timeout_s)
        self.reporter = Reporter(CoordinatorClient(url, token), self.worker_id, reg.heartbeat_interval_s)
        self.faults = FaultInjector()

    # --- lifecycle ---------------------------------------------------------------------------------
    def serve(self) -> int:
        """Run until the coordinator says exit. Returns the process exit code."""
        self.reporter.start()
        code = 0
        try:
            while True:
                plan = self.client.plan(self.worker_id)
                if plan.action == "exit" or self.reporter.exit_requested.is_set():
                    break
                if plan.action == "wait":
                    time.sleep(PLAN_POLL_S)
                    continue
                try:
                    self.reporter.update(state="training", generation=plan.generation.id)
                    self.group.join(plan.generation.id, plan.generation.rank, plan.generation.world)
                    summary = self._train(plan.generation)
                except CommError as e:
                    self._report("failed", {"error": f"collective failed: {e}", "step": self.trainer.step})
                    code = 1
                    break
                self.reporter.update(state="finished", step=self.trainer.step)
                self.reporter.flush()           # metrics reach the coordinator before 'finished'
                self._report("finished", {"summary": summary})
                self._wait_for_exit()
                break
        except Exception as e:
            self._report("failed", {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
            raise
        finally:
            self.reporter.close()
            self.group.leave()
        return code

    def _wait_for_exit(self) -> None:
        while self.client.plan(self.worker_id).action != "exit":
            time.sleep(PLAN_POLL_S)

    def _report(self, kind: str, payload: dict) -> None:
        try:
            self.client.report(Report(worker_id=self.worker_id, kind=kind, payload=payload))
        except LeptonError:
            pass  # the coordinator is gone; nothing more to tell it

    # --- one generation ----------------------------------------------------------------------------
    def _train(self, gen: Generation) -> dict | None:
        t, job, rank = self.trainer, self.job, gen.rank
        if rank == 0 and gen.resume_checkpoint and t.step == 0:
            t.load_state(read_checkpoint(gen.resume_checkpoint))
        state = self.group.broadcast_state(t.state() if rank == 0 else None, src=0)
        if rank != 0:
            t.load_state(state)
        ckpt = AsyncCheckpointer(self.run, job.checkpoint.keep, self._on_checkpoint) if rank == 0 else None
        every = job.checkpoint.every_steps
        eval_every = job.eval.every
        log_every = job.train.log_every_steps
        # throughput over the steady state: the first step of a generation (warm-up) is left out
        steady_samples, steady_s = 0, 0.0
        win_loss, win_samples, win_s = 0.0, 0, 0.0
        first = True
        while t.step < t.total_steps:
            self.faults.before_step(rank, t.step)
            r = t.train_step(self.group, gen.shares, rank)
            if not first:
                steady_samples += r.batch
                steady_s += r.wall_s
            first = False
            win_loss += r.loss * r.batch
            win_samples += r.batch
            win_s += r.wall_s
            self.reporter.update(step=t.step, samples_per_s=r.local / r.compute_s if r.compute_s > 0 else 0.0)
            if rank == 0 and (t.step % log_every == 0 or t.step == t.total_steps):
                self.reporter.push({"kind": "train", "time": time.time(), "step": t.step, "epoch": t.epoch,
                                    "total_steps": t.total_steps, "loss": win_loss / win_samples,
                                    "samples_per_s": win_samples / win_s if win_s > 0 else None})
                win_loss, win_samples, win_s = 0.0, 0, 0.0
            if ckpt and every and t.step % every == 0 and t.step < t.total_steps:
                ckpt.save(t.step, t.state())
            due = (eval_every == "epoch" and t.at_epoch_end()) or (isinstance(eval_every, int) and t.step % eval_every == 0)
            if due and t.step < t.total_steps:
                self._log_eval("val", t.evaluate(self.group, "val"), rank)
        if ckpt:
            ckpt.wait()
        results = {split: t.evaluate(self.group, split) for split in ("train", "val", "test")}
        if eval_every != "never":
            self._log_eval("val", results["val"], rank)
        if rank != 0:
            return None
        self._log_eval("test", results["test"], rank)
        path = write_checkpoint(self.run, t.step, t.state(), job.checkpoint.keep)
        self._on_checkpoint(t.step, path)
        self._write_model(results)
        return {**results, "steps": t.step, "epochs": job.train.epochs,
                "samples_per_s": round(steady_samples / steady_s, 1) if steady_s > 0 else None}

    def _log_eval(self, split: str, m: dict, rank: int) -> None:
        if rank == 0 and m.get("count"):
            self.reporter.push({"kind": "eval", "split": split, "time": time.time(), "step": self.trainer.step,
                                "epoch": self.trainer.epoch, **m})

    def _on_checkpoint(self, step: int, path: Path) -> None:
        self._report("checkpoint", {"step": step, "path": str(path)})

    def _write_model(self, results: dict) -> None:
        pre = self.trainer.cache.preprocessor
        extra = {}
        if self.run.factory_pickle.exists():
            extra["model_factory.pkl"] = self.run.factory_pickle
        meta = {"format": "lepton-model/1", "name": self.job.name, "task": self.job.task,
                "model": self.job.to_yaml_dict()["model"], "seed": self.job.seed,
                "input_shape": list(pre.input_shape), "classes": pre.classes, "preprocess": pre.to_dict(),
                "metrics": results, "step": self.trainer.step}
        write_model(self.run.model_dir, self.trainer.model.state_dict(), meta, extra)


def run_worker(url: str, token: str, cpus: list[int] | None = None, threads: int | None = None,
               connect_timeout_s: float = 120.0) -> int:
    return Worker(url, token, cpus, threads, connect_timeout_s).serve()
