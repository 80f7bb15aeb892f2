"""The coordinator as an explicit state machine.

Phases: ``waiting`` (for the target number of workers) → ``running`` (a generation trains) →
``completed`` | ``failed`` | ``stopped``. Inputs are the control-plane messages (register, heartbeat,
plan request, report) and ``tick`` (time passing); each returns the reply for that worker. The machine
does no network I/O: the HTTP server calls it under one lock, and tests step it against fake workers.
Persistent effects go through ``RunDir`` (state.json, events.jsonl, metrics.jsonl, summary.json).

Policies (here: the share plan) are plain functions returning decisions; later policies (rebalancing,
evaluation-driven LR, elastic membership) plug in at the same points: ``_form_generation`` and
``_on_report``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

from ..protocol import (Generation, Heartbeat, HeartbeatResponse, PlanResponse, RegisterRequest,
                        Report, Resources)
from ..spec import JobSpec
from ..storage.rundir import RunDir


class Phase(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.STOPPED)


@dataclass
class Member:
    worker_id: str
    host: str
    pid: int
    resources: Resources
    last_seen: float
    state: str = "registered"
    step: int = 0
    samples_per_s: float = 0.0
    rank: Optional[int] = None
    share: Optional[float] = None
    finished: bool = False


def equal_or_fixed_shares(job: JobSpec, members: list[Member]) -> list[float]:
    """The share policy of the core: the spec's fixed ``cluster.shares`` or equal shares."""
    if job.cluster.shares and len(job.cluster.shares) == len(members):
        return list(job.cluster.shares)
    return [1.0] * len(members)


@dataclass
class Coordinator:
    job: JobSpec
    run: RunDir
    target_workers: int
    train_rows: int = 0                           # size of the training split (for total_steps)
    resume_checkpoint: Optional[dict] = None     # {"step": int, "path": str} from state.json
    clock: Callable[[], float] = time.monotonic
    share_policy: Callable[[JobSpec, list[Member]], list[float]] = equal_or_fixed_shares

    phase: Phase = Phase.WAITING
    members: dict[str, Member] = field(default_factory=dict)
    generation: Optional[int] = None
    generation_members: list[str] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    step: int = 0
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    samples_per_s: Optional[float] = None
    latest_checkpoint: Optional[dict] = None
    reason: str = ""
    summary: Optional[dict] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    events: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.train_rows:
            self.total_steps = -(-self.train_rows // self.job.train.batch_size) * self.job.train.epochs
        self.latest_checkpoint = self.resume_checkpoint
        if self.resume_checkpoint:
            self.step = int(self.resume_checkpoint["step"])
        self._persist()

    @property
    def epoch(self) -> int:
        """Epochs completed, derived from the step (the last step of an epoch completes it)."""
        per_epoch = -(-self.train_rows // self.job.train.batch_size) if self.train_rows else 0
        return min(self.step // per_epoch, self.job.train.epochs) if per_epoch else 0

    # --- inputs ----------------------------------------------------------------------------------
    def register(self, req: RegisterRequest) -> str:
        wid = f"w{len(self.members)}-{uuid.uuid4().hex[:6]}"
        self.members[wid] = Member(wid, req.host, req.pid, req.resources, self.clock())
        self._event("worker_registered", f"{wid} on {req.host} (pid {req.pid})",
                    worker=wid, host=req.host, resources=req.resources.model_dump())
        if self.phase == Phase.WAITING and len(self.members) >= self.target_workers:
            self._form_generation()
        return wid

    def heartbeat(self, hb: Heartbeat) -> HeartbeatResponse:
        m = self.members.get(hb.worker_id)
        if m is None:
            return HeartbeatResponse(action="exit")
        m.last_seen = self.clock()
        m.state, m.step, m.samples_per_s = hb.state, hb.step, hb.samples_per_s
        if self.phase == Phase.RUNNING and hb.worker_id in self.generation_members:
            self.step = max(self.step, hb.step)
        return HeartbeatResponse(action="exit" if self.phase.final else "continue")

    def plan(self, worker_id: str) -> PlanResponse:
        m = self.members.get(worker_id)
        if m is None:
            return PlanResponse(action="exit", reason="unknown worker")
        m.last_seen = self.clock()
        if self.phase.final:
            return PlanResponse(action="exit", reason=f"job {self.phase.value}")
        if self.phase == Phase.RUNNING and worker_id in self.generation_members:
            rank = self.generation_members.index(worker_id)
            return PlanResponse(action="run", generation=Generation(
                id=self.generation, rank=rank, world=len(self.generation_members), shares=self.shares,
                members=self.generation_members,
                resume_checkpoint=self.resume_checkpoint["path"] if self.resume_checkpoint else None))
        waiting = f"{len(self.members)}/{self.target_workers} workers" if self.phase == Phase.WAITING else "next generation"
        return PlanResponse(action="wait", reason=f"waiting for {waiting}")

    def report(self, r: Report) -> None:
        m = self.members.get(r.worker_id)
        if m is None:
            return
        m.last_seen = self.clock()
        p = r.payload
        if r.kind == "metrics":
            for rec in p.get("records", []):
                self.run.append_jsonl(self.run.metrics_jsonl, rec)
                if rec.get("kind") == "train":
                    self.step = max(self.step, rec["step"])
                    self.loss, self.samples_per_s = rec["loss"], rec.get("samples_per_s")
                    self.total_steps = rec.get("total_steps", self.total_steps)
            self._persist()
        elif r.kind == "checkpoint":
            self.latest_checkpoint = {"step": p["step"], "path": p["path"]}
            self._event("checkpoint", f"checkpoint at step {p['step']}", **p)
            self._persist()
        elif r.kind == "finished":
            m.finished, m.state = True, "finished"
            if p.get("summary"):
                self.summary = p["summary"]
            if self.phase == Phase.RUNNING and all(self.members[w].finished for w in self.generation_members):
                self._complete()
        elif r.kind == "failed":
            m.state = "failed"
            self._fail(f"worker {r.worker_id} failed: {p.get('error', 'unknown error')}")

    def tick(self) -> None:
        """Time passes: a running member silent for longer than the heartbeat timeout is lost."""
        if self.phase != Phase.RUNNING:
            return
        now = self.clock()
        for wid in self.generation_members:
            m = self.members[wid]
            if not m.finished and now - m.last_seen > self.job.cluster.heartbeat_timeout_s:
                m.state = "lost"
                self._fail(f"worker {wid} lost: no heartbeat for {now - m.last_seen:.1f} s"
                           f" (cluster.heartbeat_timeout_s={self.job.cluster.heartbeat_timeout_s:g})")
                return

    def process_exited(self, pid: int, code: int) -> None:
        """A locally supervised worker process ended; unless it had finished, the job has lost it."""
        for m in self.members.values():
            if m.pid == pid and not m.finished and m.worker_id in self.generation_members:
                m.state = "lost"
                self._fail(f"worker {m.worker_id} (pid {pid}) exited with code {code}")

    def stop(self, reason: str) -> None:
        if not self.phase.final:
            self.phase, self.reason, self.ended_at = Phase.STOPPED, reason, self.clock()
            self._event("stopped", reason)
            self._persist()

    # --- transitions -----------------------------------------------------------------------------
    def _form_generation(self) -> None:
        chosen = list(self.members.values())[:self.target_workers]
        self.generation = 0 if self.generation is None else self.generation + 1
        self.generation_members = [m.worker_id for m in chosen]
        self.shares = self.share_policy(self.job, chosen)
        for rank, m in enumerate(chosen):
            m.rank, m.share, m.state = rank, self.shares[rank], "training"
        if self.started_at is None:
            self.started_at = self.clock()
        self.phase = Phase.RUNNING
        self._event("generation", f"generation {self.generation} with {len(chosen)} workers",
                    generation=self.generation, members=self.generation_members, shares=self.shares,
                    start_step=self.step)
        self._persist()

    def _complete(self) -> None:
        self.phase, self.ended_at = Phase.COMPLETED, self.clock()
        summary = dict(self.summary or {})
        summary.update(status="completed", workers=len(self.generation_members),
                       wall_s=round(self.ended_at - self.started_at, 3))
        self.summary = summary
        self.step = summary.get("steps", self.step)
        self.run.write_summary(summary)
        self._event("completed", f"training completed at step {summary.get('steps')}")
        self._persist()

    def _fail(self, reason: str) -> None:
        if self.phase.final:
            return
        self.phase, self.reason, self.ended_at = Phase.FAILED, reason, self.clock()
        self._event("failed", reason)
        self._persist()

    # --- persistence and views ---------------------------------------------------------------------
    def _event(self, kind: str, reason: str, **details) -> None:
        ev = {"time": time.time(), "kind": kind, "reason": reason, **details}
        self.events.append(ev)
        self.run.append_jsonl(self.run.events_jsonl, ev)

    def _persist(self) -> None:
        self.run.write_state({
            "status": self.phase.value, "reason": self.reason, "name": self.job.name,
            "generation": self.generation, "step": self.step, "epoch": self.epoch,
            "total_steps": self.total_steps, "latest_checkpoint": self.latest_checkpoint,
            "workers": len(self.generation_members)})

    def status(self) -> dict:
        now = self.clock()
        return {
            "name": self.job.name, "status": self.phase.value, "reason": self.reason,
            "generation": self.generation, "step": self.step, "epoch": self.epoch,
            "epochs": self.job.train.epochs, "total_steps": self.total_steps, "loss": self.loss,
            "samples_per_s": self.samples_per_s, "target_workers": self.target_workers,
            "latest_checkpoint": self.latest_checkpoint, "run_dir": str(self.run.root),
            "summary": self.summary,
            "workers": [{"worker_id": m.worker_id, "host": m.host, "pid": m.pid, "state": m.state,
                         "rank": m.rank, "share": m.share, "step": m.step,
                         "samples_per_s": round(m.samples_per_s, 1),
                         "last_seen_s": round(now - m.last_seen, 2)} for m in self.members.values()],
            "events": self.events[-20:],
        }
