"""The coordinator as an explicit state machine.

Phases::

    waiting ──(enough workers)──▶ running ──(loss, join, leave, stop)──▶ regrouping
       ▲                            │  ▲                                   │
       └──(fewer than min_workers)──┼──┴───(every member paused or lost)───┘
                                    ▼
                       completed | failed | stopped

A *generation* is one membership with its own process group. It ends when a member is lost (a
survivor's collective failed, the process exited, or its heartbeat timed out), a worker joins or
leaves, or a stop is requested. Ending it is agreed on the data plane: the coordinator raises a
``regroup`` flag in heartbeat replies, every worker puts it into the step's allreduce, and all of them
see the reduced flag at the same step, finish that step and pause (invariant 5). Survivors of a failure
pause where their failed collective left them; they are at most one step apart, and the most advanced
one becomes rank 0 of the next generation and the source of its state broadcast (invariant 3). No
checkpoint is reloaded unless no live replica is left.

Inputs are the control-plane messages (register, heartbeat, plan, report), ``tick`` (time passing),
``process_exited`` (local supervision) and ``request_stop``. The machine does no network I/O: the HTTP
server calls it under one lock, and tests step it against fake workers with a fake clock. Persistent
effects go through ``RunDir`` (state.json, events.jsonl, metrics.jsonl, summary.json).
"""
from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

from ..protocol import (Generation, Heartbeat, HeartbeatResponse, PlanResponse, RegisterRequest,
                        Report, Resources, StepPlan)
from . import balance
from .tensorboard import TensorBoardSink
from ..spec import JobSpec
from ..storage.rundir import RunDir

# Once a generation is broken, a member still marked as training that has been silent this long is
# taken for dead (heartbeats come every 0.5 s from a thread independent of the training loop).
SUSPECT_SILENCE_S = 2.0
# state.json for progress alone (the step of a metrics report) is written at most this often (_persist)
PROGRESS_PERSIST_S = 1.0


class Phase(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    REGROUPING = "regrouping"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.STOPPED)


GONE = ("lost", "left")


@dataclass
class Member:
    worker_id: str
    host: str
    pid: int
    resources: Resources
    last_seen: float
    state: str = "joining"          # joining | standby | training | paused | finished | lost | left
    step: int = 0                   # steps completed by this replica
    samples_per_s: float = 0.0
    rank: Optional[int] = None
    share: Optional[float] = None
    generation: Optional[int] = None
    speed: Optional[float] = None   # samples per second of processor time at its current operating point
    speed_plan: Optional[tuple[int, int]] = None   # (generation, plan version) its last measurement was at
    # per step, smoothed: samples, busy s, compute s, fixed part of compute s (Heartbeat.step_*)
    measured: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    cost: Optional[balance.StepCost] = None   # from ``measured``
    capacity: float = 1.0           # cores it can count on in its generation (balance.capacities)
    plan_version: int = 0           # the share plan it has applied
    run_sent: bool = False          # it was told to start its generation (``plan`` answered ``run``)


def initial_shares(job: JobSpec, members: list[Member]) -> list[float]:
    """Shares of a new generation: the spec's fixed ``cluster.shares`` (``ClusterSpec.fixed_shares``); with
    balancing off, equal; else proportional to effective speed when every member's is known from an
    earlier generation, or to capacity (its resources) when not."""
    fixed = job.cluster.fixed_shares(len(members))
    if fixed:
        return fixed
    if job.cluster.balance == "off" or not members:
        return [1.0] * len(members)
    if all(m.cost for m in members):
        return balanced_shares(job, members)
    return [round(s, 4) for s in balance.normalise([m.capacity for m in members])]


def balanced_shares(job: JobSpec, members: list[Member], current: Optional[list[float]] = None) -> list[float]:
    """Shares that equalise the members' step times; from ``current`` shares (a re-plan), none shrinks
    by more than ``balance.SHRINK`` at once."""
    batch = job.train.batch_size
    minimum = balance.shrink_limits(current, batch) if current else None
    return [round(s, 4) for s in balance.target_shares([m.cost for m in members], [m.capacity for m in members],
                                                       batch, minimum)]


@dataclass
class Coordinator:
    job: JobSpec
    run: RunDir
    target_workers: int                          # workers needed before the first generation
    train_rows: int = 0                          # size of the training split (for total_steps)
    resume_checkpoint: Optional[dict] = None     # {"step": int, "path": str} from state.json
    previous_generation: Optional[int] = None    # on --resume: the generation state.json last recorded
    clock: Callable[[], float] = time.monotonic
    share_policy: Callable[[JobSpec, list[Member]], list[float]] = initial_shares

    phase: Phase = Phase.WAITING
    members: dict[str, Member] = field(default_factory=dict)
    generation: Optional[int] = None
    generation_members: list[str] = field(default_factory=list)
    generation_world: int = 0
    generation_start_step: int = 0
    shares: list[float] = field(default_factory=list)
    step_plan: StepPlan = field(default_factory=lambda: StepPlan(version=0, shares=[]))   # the issued plan
    generation_plan: StepPlan = field(default_factory=lambda: StepPlan(version=0, shares=[]))  # its version 0
    plan_version: int = 0                        # step plans issued within the current generation
    plan_step: int = 0                           # step at which the last re-plan was considered
    plan_settled: bool = False                   # the last re-plan kept the shares (see heartbeat)
    shares_guessed: bool = False                 # the generation started from capacity-based shares
    step: int = 0
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    samples_per_s: Optional[float] = None
    latest_checkpoint: Optional[dict] = None
    reason: str = ""
    summary: Optional[dict] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    stop_requested: Optional[str] = None
    waiting_since: Optional[float] = None
    checkpoint_from: Optional[str] = None        # worker asked to write its state as a checkpoint
    source_is_checkpoint: bool = True            # the current generation starts from a checkpoint file
    incidents: list[dict] = field(default_factory=list)   # failures not yet recovered from
    events: list[dict] = field(default_factory=list)
    tensorboard: Optional[TensorBoardSink] = None
    _persisted: Optional[dict] = None            # what state.json holds (``_persist``)
    _persisted_at: float = 0.0

    def __post_init__(self):
        self.tensorboard = TensorBoardSink(self.run.tensorboard_dir)
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
        return wid

    def _adoptable(self, hb: Heartbeat) -> bool:
        """A worker of the generation that was training when this coordinator's predecessor died
        (``--resume`` on a live run): the data plane went on without us, so take it back as it is."""
        return (hb.generation is not None and hb.generation == self.previous_generation and hb.rank is not None
                and hb.state == "training" and self.phase in (Phase.WAITING, Phase.RUNNING)
                and self.generation in (None, hb.generation))

    def _adopt(self, hb: Heartbeat) -> Member:
        now = self.clock()
        m = Member(hb.worker_id, hb.host, hb.pid, hb.resources or Resources(), now, state="training",
                   step=hb.step, rank=hb.rank, generation=hb.generation, plan_version=hb.plan_version, run_sent=True)
        self.members[hb.worker_id] = m
        if self.generation is None:
            self.generation, self.generation_world = hb.generation, hb.world
            self.phase, self.started_at, self.source_is_checkpoint = Phase.RUNNING, now, False
            self.shares = [1.0] * hb.world
            self.step_plan = self.generation_plan = StepPlan(version=0, shares=self.shares, generation=self.generation)
        # the workers train with the predecessor's last plan, which their heartbeats carry: a re-plan
        # starts from those shares and is numbered after it, or they would not apply it
        self.generation_members = sorted(self.generation_members + [m.worker_id], key=lambda w: self.members[w].rank)
        m.share = self.shares[m.rank] if m.rank < len(self.shares) else None
        if len(hb.shares) == self.generation_world and hb.plan_version >= self.step_plan.version:
            self._follow_plan(hb)
        if len(self.generation_members) == self.generation_world:     # all back: capacities as at formation
            self._assign_capacities([self.members[w] for w in self.generation_members])
        self.plan_version = max(self.plan_version, hb.plan_version)
        self.step = max(self.step, hb.step)
        self._event("worker_adopted", f"{m.worker_id} (rank {hb.rank} of generation {hb.generation}) kept training"
                    f" while the coordinator was down; adopted at step {hb.step}", worker=m.worker_id)
        self._persist()
        return m

    def _follow_plan(self, hb: Heartbeat) -> None:
        """A member trains with a newer plan than this coordinator issued: its predecessor's last one,
        applied after the adoption. Taken as the current plan, or re-plans would wait for ever for the
        members to be at ``plan_version``."""
        self.plan_version = hb.plan_version
        self.shares = list(hb.shares)
        self.step_plan = StepPlan(version=hb.plan_version, shares=self.shares, generation=self.generation)
        for w in self.generation_members:
            m = self.members[w]
            m.share = self.shares[m.rank] if m.rank < len(self.shares) else None

    def _on_ready(self, m: Member) -> None:
        training = sum(1 for x in self.members.values() if x.state == "training")
        if self.phase == Phase.RUNNING and training < self._max_workers():
            self._regroup(f"worker {m.worker_id} joined")
        else:
            self._advance()

    def heartbeat(self, hb: Heartbeat) -> HeartbeatResponse:
        m = self.members.get(hb.worker_id)
        if m is None and self._adoptable(hb):
            m = self._adopt(hb)
        if hb.records and m is not None and m.state != "lost":   # a lost member's records are stale
            self._take_metrics(hb.records)
        if m is None or m.state in GONE or self.phase.final:
            return HeartbeatResponse(action="exit")
        m.last_seen = self.clock()
        m.samples_per_s = hb.samples_per_s
        current = hb.generation is not None and hb.generation == self.generation
        plan = None
        if current and m.state == "training":
            if hb.plan_version > self.plan_version and len(hb.shares) == self.generation_world:
                self._follow_plan(hb)
            m.step = hb.step
            m.plan_version = hb.plan_version
            if hb.step_busy_s > 0:
                self._measured(m, hb)
            self.step = max(self.step, hb.step)
            if self.incidents and self.phase == Phase.RUNNING and hb.step > self.generation_start_step:
                self._recovered()
            self._maybe_replan()
            if m.plan_version < self.plan_version:
                plan = self.step_plan
        regroup = (self.phase == Phase.REGROUPING and m.state == "training" and current)
        return HeartbeatResponse(action="continue", regroup_generation=self.generation if regroup else None,
                                 plan=plan)

    def plan(self, worker_id: str) -> PlanResponse:
        m = self.members.get(worker_id)
        if m is None or m.state in GONE:
            return PlanResponse(action="exit", reason="not a member of this job (lost or left)")
        m.last_seen = self.clock()
        if self.phase.final:
            return PlanResponse(action="exit", reason=f"job {self.phase.value}")
        if m.state == "joining":              # its first plan request: model and data are loaded
            m.state = "standby"
            self._on_ready(m)
        if self.checkpoint_from == worker_id:
            return PlanResponse(action="checkpoint", reason="save the live state before waiting or stopping")
        # a member that has not started its generation yet still does when a regroup began in the
        # meantime (a join, a stop, a loss): told to wait it would stay "training" for good, and the
        # others could not finish the rendezvous; started, it hears the regroup and pauses like them
        startable = self.phase == Phase.RUNNING or (self.phase == Phase.REGROUPING and not m.run_sent)
        if startable and m.state == "training" and worker_id in self.generation_members:
            m.run_sent = True
            resume = None
            if m.rank == 0 and self.source_is_checkpoint and self.latest_checkpoint:
                resume = self.latest_checkpoint["path"]
            return PlanResponse(action="run", generation=Generation(
                id=self.generation, rank=m.rank, world=len(self.generation_members),
                shares=self.generation_plan.shares, members=self.generation_members,
                start_step=self.generation_start_step, resume_checkpoint=resume, backend=self._backend()))
        return PlanResponse(action="wait", reason=f"{self.phase.value}: {self._waiting_for()}")

    def _take_metrics(self, records: list[dict]) -> None:
        """metrics.jsonl records from a member (in its heartbeat, or a ``metrics`` report)."""
        for rec in records:
            self.run.append_jsonl(self.run.metrics_jsonl, rec)
            self.tensorboard.record(rec)
            if rec.get("kind") == "train":
                self.step = max(self.step, rec["step"])
                self.loss, self.samples_per_s = rec["loss"], rec.get("samples_per_s")
            elif rec.get("kind") == "best":
                self._event("best", f"best {rec['metric']} so far: {rec['value']:.6g} at step {rec['step']}",
                            step=rec["step"], value=rec["value"], metric=rec["metric"])
            elif rec.get("kind") == "decision":        # a policy's decision, taken on every worker
                self._event(rec["decision"], rec["reason"], step=rec["step"], **rec.get("details", {}))
            elif rec.get("kind") == "eval":            # after an evaluation: a re-plan point too
                self._maybe_replan()
        self._persist(progress=True)

    def report(self, r: Report) -> None:
        m = self.members.get(r.worker_id)
        if m is None:
            return
        if m.state in GONE and r.kind in ("paused", "finished", "failed"):
            return          # it was told to exit: taking it back would count a dead worker as alive
        m.last_seen = self.clock()
        p = r.payload
        if r.kind == "metrics":
            self._take_metrics(p.get("records", []))
        elif r.kind == "checkpoint":
            if not self.latest_checkpoint or p["step"] >= self.latest_checkpoint["step"]:
                self.latest_checkpoint = {"step": p["step"], "path": p["path"]}
            self._event("checkpoint", f"checkpoint at step {p['step']} by {r.worker_id}", **p)
            # a background checkpoint of an earlier step can land after the request: only one of the
            # live state (the step the worker paused at) fulfils it
            if self.checkpoint_from == r.worker_id and p["step"] >= m.step:
                self.checkpoint_from = None
            self._persist()
            self._advance()
        elif r.kind == "finished":
            m.state = "finished"
            m.step = p.get("step", m.step)
            if p.get("summary"):
                self.summary = p["summary"]
            # rank 0's summary comes after the final evaluation, a collective every rank took part in,
            # and after the model was written: once no member is still training the job is done, even
            # if a regroup (a stop, a join, a loss) began meanwhile and made the members that had
            # finished paused ones
            if (self.summary is not None and len(self.generation_members) == self.generation_world
                    and all(self.members[w].state != "training" for w in self.generation_members)):
                if not self.phase.final:
                    self._complete()
            else:
                self._advance()
        elif r.kind == "paused":
            self._on_paused(m, p)
        elif r.kind == "failed":
            m.state = "lost"
            error = p.get("error", "unknown error")
            self.fail(error if error.startswith("training diverged") else f"worker {r.worker_id} failed: {error}")

    def tick(self) -> None:
        """Time passes: silent members are lost; a wait for workers may reach its deadline."""
        if self.phase.final:
            return
        self._persist(progress=True)              # a step that metrics reports left unwritten
        now = self.clock()
        timeout = self.job.cluster.heartbeat_timeout_s
        for m in list(self.members.values()):
            if m.state in GONE or m.state == "finished":
                continue
            silent = now - m.last_seen
            if silent > timeout:
                self._lose(m, f"heartbeat timeout ({silent:.1f} s silent,"
                              f" cluster.heartbeat_timeout_s={timeout:g})")
            elif self.phase == Phase.REGROUPING and m.state == "training" and silent > SUSPECT_SILENCE_S:
                self._lose(m, f"silent for {silent:.1f} s while its generation regrouped")
        if (self.phase == Phase.WAITING and self.waiting_since is not None and self.checkpoint_from is None
                and now - self.waiting_since > self.job.cluster.wait_for_workers_s):
            alive = len(self._alive())
            self.fail(f"only {alive} worker(s) alive, fewer than cluster.min_workers="
                      f"{self.job.cluster.min_workers}, for {self.job.cluster.wait_for_workers_s:g} s"
                      f" (cluster.wait_for_workers_s); the last checkpoint is at step "
                      f"{(self.latest_checkpoint or {}).get('step', 0)}")

    def process_exited(self, pid: int, code: int) -> None:
        """A locally supervised worker process ended."""
        for m in self.members.values():
            if m.pid == pid and m.state not in GONE and m.state != "finished":
                self._lose(m, f"process exited with code {code}")

    def request_stop(self, reason: str) -> None:
        """Stop at the next step boundary with a checkpoint of the live state, then end ``stopped``."""
        if self.phase.final or self.stop_requested:
            return
        self.stop_requested = reason
        self._event("stop_requested", reason)
        if self.phase == Phase.RUNNING:
            self._regroup(reason)
        else:
            self._advance()

    def note(self, kind: str, reason: str, **details) -> None:
        """An event from outside the machine (e.g. the launcher restarted a local worker)."""
        self._event(kind, reason, **details)

    def stop_now(self, reason: str) -> None:
        if not self.phase.final:
            self._end(Phase.STOPPED, reason)

    def fail(self, reason: str) -> None:
        if not self.phase.final:
            self._end(Phase.FAILED, reason)

    # --- transitions -----------------------------------------------------------------------------
    def _on_paused(self, m: Member, p: dict) -> None:
        why = p.get("reason", "regroup")
        m.step = p.get("step", m.step)
        if why == "leaving":
            m.state = "left"
            self._event("worker_left", f"{m.worker_id} left gracefully at step {m.step}", worker=m.worker_id)
        else:
            m.state = "paused"
        if why == "collective_error" and self.phase == Phase.RUNNING and p.get("generation") == self.generation:
            self._open_incident(f"collective error reported by {m.worker_id}: {p.get('error', '')}")
            self._regroup(f"a collective failed in generation {self.generation}", worker=m.worker_id,
                          error=str(p.get("error", ""))[:300])
        elif why == "leaving" and self.phase == Phase.RUNNING:
            self._regroup(f"worker {m.worker_id} left")
        self._advance()

    def _lose(self, m: Member, how: str) -> None:
        in_generation = m.worker_id in self.generation_members and m.state in ("training", "paused")
        m.state = "lost"
        if self.checkpoint_from == m.worker_id:
            self.checkpoint_from = None
        self._event("worker_lost", f"{m.worker_id} lost: {how}", worker=m.worker_id, detected_by=how,
                    step=m.step)
        if in_generation and self.phase == Phase.RUNNING:
            self._open_incident(f"{m.worker_id}: {how}")
            self._regroup(f"worker {m.worker_id} lost")
        self._advance()

    def _open_incident(self, detected_by: str) -> None:
        self.incidents.append({"detected_by": detected_by, "detected_at": self.clock(),
                               "generation": self.generation, "step_before": self.step})

    def _recovered(self) -> None:
        now = self.clock()
        for inc in self.incidents:
            lost = max(0, inc["step_before"] - self.generation_start_step)
            self._event("recovered", f"recovered from '{inc['detected_by']}' in {now - inc['detected_at']:.2f} s;"
                        f" resumed at step {self.generation_start_step}, {lost} completed step(s) lost",
                        detected_by=inc["detected_by"], recovery_s=round(now - inc["detected_at"], 3),
                        regroup_s=round(inc.get("formed_at", now) - inc["detected_at"], 3),
                        resumed_at_step=self.generation_start_step, steps_lost=lost,
                        generation=self.generation)
        self.incidents = []

    def _measured(self, m: Member, hb: Heartbeat) -> None:
        """A full window of ``m``'s steps at its plan, smoothed within the plan; at another plan it is
        another operating point (bigger shares amortise the fixed cost), and replaces the old one."""
        point = (hb.step_samples, hb.step_busy_s, hb.step_compute_s, hb.step_compute_fixed_s)
        at = (self.generation, hb.plan_version)
        m.measured = point if m.speed_plan != at else tuple(map(balance.smooth, m.measured, point))
        m.cost = balance.StepCost.measured(*m.measured, previous=m.cost)
        m.speed, m.speed_plan = m.measured[0] / m.measured[1], at

    def _balancing(self) -> bool:
        return (self.phase == Phase.RUNNING and self.job.cluster.balance == "on"
                and self.job.cluster.fixed_shares(self.generation_world) is None)

    def _replan_step(self) -> int:
        """From which step the next re-plan is considered: while the plan is unsettled (a generation's
        first, or the last consideration changed the shares), as soon as every member has measured the
        current plan — a full window is spacing enough, and waiting longer is steps at worse shares
        (with 20 steps between considerations, three plans took until step ~60 of the benchmark's 353);
        once settled, every ``cluster.rebalance_every_steps``."""
        return self.plan_step + (self.job.cluster.rebalance_every_steps if self.plan_settled else 0)

    def _maybe_replan(self) -> None:
        """The balancing policy's decision point: from ``_replan_step``, once every member applied the
        last plan and measured it, shares follow the measured step costs (with hysteresis). The plan
        goes out in the reply to the heartbeat that completed the measurements (and to any later one
        from a member still at the old plan); that worker carries it to the others in its next step's
        gradient reduction, after which every member applies it."""
        if self.phase != Phase.RUNNING:
            return
        members = [self.members[w] for w in self.generation_members]
        if len(members) < self.generation_world or any(m.plan_version != self.plan_version for m in members):
            return                          # a member still to be adopted, or a plan still to be applied
        shares = self.step_plan.shares
        if (self._balancing() and self.step >= self._replan_step()
                and all(m.speed_plan == (self.generation, self.plan_version) for m in members)):
            self.plan_step = self.step
            speeds = [m.speed * m.capacity for m in members]
            fixed = [round(m.cost.fixed * 1e3, 3) for m in members]
            per_sample = [round(m.cost.per_sample * 1e6, 3) for m in members]
            # the first plan after shares guessed from capacities may move anywhere; every other one
            # only within balance.SHRINK of the current shares
            free = self.plan_version == 0 and self.shares_guessed
            new = balance.propose(shares, balanced_shares(self.job, members, None if free else shares),
                                  [m.cost for m in members], [m.capacity for m in members], self.job.train.batch_size)
            self.plan_settled = new is None
            if new is not None:
                shares = new
                self._event("plan", f"shares {new} for speeds {[round(s) for s in speeds]} samples/s; step cost"
                            f" {fixed} ms + n x {per_sample} us (ideal gain over equal shares"
                            f" {balance.ideal_gain(speeds):.2f}x)",
                            generation=self.generation, version=self.plan_version + 1, step=self.step,
                            speeds=[round(s, 1) for s in speeds], fixed_ms=fixed, per_sample_us=per_sample,
                            capacities=[round(m.capacity, 4) for m in members], shares=new,
                            workers=self.generation_members)
        if shares == self.step_plan.shares:
            return
        self.plan_version += 1
        self.step_plan = StepPlan(version=self.plan_version, shares=shares, generation=self.generation)
        self.shares = shares
        for m, share in zip(members, shares):
            m.share = share
        self._persist()

    def _regroup(self, reason: str, **details) -> None:
        if self.phase == Phase.RUNNING:
            for w in self.generation_members:      # a finished replica holds the final state: reuse it
                if self.members[w].state == "finished":
                    self.members[w].state = "paused"
            self.phase = Phase.REGROUPING
            self._event("regroup", reason, generation=self.generation, **details)
            self._persist()

    def _advance(self) -> None:
        """Move on once the current generation has wound down (or nothing is running)."""
        if self.phase in (Phase.RUNNING,) or self.phase.final:
            return
        if self.phase == Phase.REGROUPING and any(
                self.members[w].state == "training" for w in self.generation_members):
            return                                   # still waiting for members to pause
        if self.checkpoint_from is not None:
            return                                   # a checkpoint of the live state is being written
        paused = sorted((m for m in self.members.values() if m.state == "paused"), key=lambda m: -m.step)
        best = paused[0] if paused else None
        behind = best is not None and (not self.latest_checkpoint or self.latest_checkpoint["step"] < best.step)
        if self.stop_requested:
            if behind:
                self.checkpoint_from = best.worker_id
                return
            self._end(Phase.STOPPED, self.stop_requested)
            return
        alive = self._alive()
        needed = self.target_workers if self.started_at is None else self.job.cluster.min_workers
        if len(alive) >= max(1, needed):
            self._form_generation(alive, best)
            return
        if self.phase != Phase.WAITING or (self.started_at is not None and self.waiting_since is None):
            self.phase = Phase.WAITING
            if self.started_at is not None:
                self.waiting_since = self.clock()
                self._event("waiting", f"{len(alive)} worker(s) alive, cluster.min_workers is "
                                       f"{self.job.cluster.min_workers}: training paused")
            if behind:
                self.checkpoint_from = best.worker_id      # keep the live state safe while waiting
            self._persist()

    def _form_generation(self, alive: list[Member], source: Optional[Member]) -> None:
        rest = [m for m in alive if m is not source]
        rest.sort(key=lambda m: (m.state != "paused", -m.step, list(self.members).index(m.worker_id)))
        chosen = ([source] if source else []) + rest
        chosen = chosen[:self._max_workers()]
        last = self.generation if self.generation is not None else self.previous_generation
        self.generation = 0 if last is None else last + 1
        self.generation_members = [m.worker_id for m in chosen]
        self.generation_world = len(chosen)
        self._assign_capacities(chosen)
        self.shares = self.share_policy(self.job, chosen)
        self.shares_guessed = not all(m.cost for m in chosen)    # from capacities: no measured costs yet
        self.plan_version = 0
        self.step_plan = self.generation_plan = StepPlan(version=0, shares=self.shares, generation=self.generation)
        # the state comes from the most advanced live replica, or from the checkpoint if none is left
        self.source_is_checkpoint = source is None
        if source is not None:
            self.generation_start_step = source.step
        else:
            self.generation_start_step = self.latest_checkpoint["step"] if self.latest_checkpoint else 0
        for rank, m in enumerate(chosen):
            m.rank, m.share, m.state, m.generation = rank, self.shares[rank], "training", self.generation
            m.step, m.plan_version, m.run_sent = self.generation_start_step, 0, False
        self.step = self.generation_start_step         # back to a checkpoint's step if that is the source
        # the first re-plan of a generation is due as soon as every member measured a full window
        self.plan_step, self.plan_settled = self.generation_start_step, False
        for inc in self.incidents:
            inc.setdefault("formed_at", self.clock())
        if self.started_at is None:
            self.started_at = self.clock()
        self.phase, self.waiting_since = Phase.RUNNING, None
        self._event("generation", f"generation {self.generation} with {len(chosen)} worker(s) from step "
                    f"{self.generation_start_step}", generation=self.generation, members=self.generation_members,
                    shares=self.shares, start_step=self.generation_start_step, backend=self._backend(),
                    state_from="checkpoint" if source is None else source.worker_id)
        self._persist()

    def _complete(self) -> None:
        summary = dict(self.summary or {})
        self.ended_at = self.clock()
        summary.update(status="completed", workers=len(self.generation_members),
                       wall_s=round(self.ended_at - self.started_at, 3), members=self._member_costs())
        self.summary = summary
        self.step = summary.get("steps", self.step)
        self.run.write_summary(summary)
        self._end(Phase.COMPLETED, f"training completed at step {self.step}")

    def _end(self, phase: Phase, reason: str) -> None:
        self.phase, self.reason, self.ended_at = phase, reason, self.clock()
        self.tensorboard.close()
        self._event(phase.value, reason)
        self._persist()

    # --- helpers and views -----------------------------------------------------------------------
    def _assign_capacities(self, members: list[Member]) -> None:
        gpus = self.job.cluster.device != "cpu"        # a worker told to train on its CPU is a CPU worker
        caps = balance.capacities([(m.host, m.resources.cpu_list, m.resources.threads, gpus and bool(m.resources.gpus))
                                   for m in members])
        for m, cap in zip(members, caps):
            m.capacity = cap

    def _backend(self) -> str:
        """NCCL when every member trains on a GPU of its own, gloo otherwise (CPU, or a shared GPU)."""
        if self.job.cluster.device == "cpu":
            return "gloo"
        firsts = [self.members[w].resources.gpus[:1] for w in self.generation_members]
        own = all(firsts) and len({(self.members[w].host, f[0]) for w, f in zip(self.generation_members, firsts)}) == len(firsts)
        return "nccl" if own else "gloo"

    def _member_costs(self) -> list[dict]:
        """The last generation's members at their last measured operating point: share, effective
        speed (samples per second of wall time, capacity included) and step cost."""
        out, total = [], sum(self.members[w].share or 0.0 for w in self.generation_members) or 1.0
        for w in self.generation_members:
            m = self.members[w]
            out.append({"worker": w, "share": round((m.share or 0.0) / total, 4), "capacity": round(m.capacity, 4),
                        "speed": round(m.speed * m.capacity, 1) if m.speed else None,
                        "fixed_ms": round(m.cost.fixed * 1e3, 3) if m.cost else None,
                        "per_sample_us": round(m.cost.per_sample * 1e6, 3) if m.cost else None})
        return out

    def _alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.state in ("standby", "paused")]

    def _max_workers(self) -> int:
        """At most ``cluster.max_workers`` train (the spec keeps it within the batch), and never more
        than the global batch has samples (a rank with none would measure no speed): the others wait as
        standby."""
        return self.job.cluster.max_workers or self.job.train.batch_size

    def _waiting_for(self) -> str:
        if self.phase == Phase.REGROUPING:
            return "the current generation to pause"
        needed = self.target_workers if self.started_at is None else self.job.cluster.min_workers
        return f"{len(self._alive())}/{needed} workers"

    def _event(self, kind: str, reason: str, **details) -> None:
        ev = {"time": time.time(), "kind": kind, "reason": reason, **details}
        self.events.append(ev)
        self.run.append_jsonl(self.run.events_jsonl, ev)

    def _persist(self, progress: bool = False) -> None:
        """Write state.json (atomically, fsynced) if it changed. ``progress``: the caller moved only the
        step (a metrics report, several a second while training); a change of the step and epoch alone
        is then written at most every ``PROGRESS_PERSIST_S``, the rest by ``tick`` — each write is an
        fsync under the server's lock, and resuming needs the checkpoint pointer, which is written at
        once like every other change."""
        state = {
            "status": self.phase.value, "reason": self.reason, "name": self.job.name,
            # until a member is adopted or a generation formed, the predecessor's (another --resume needs it)
            "generation": self.generation if self.generation is not None else self.previous_generation,
            "step": self.step, "epoch": self.epoch,
            "total_steps": self.total_steps, "latest_checkpoint": copy.deepcopy(self.latest_checkpoint),
            "workers": len(self.generation_members)}
        last = self._persisted
        if state == last:
            return
        now = self.clock()
        if (progress and last is not None and now - self._persisted_at < PROGRESS_PERSIST_S
                and all(state[k] == last.get(k) for k in state if k not in ("step", "epoch"))):
            return
        self.run.write_state(state)
        self._persisted, self._persisted_at = state, now

    def _in_plan(self, m: Member) -> bool:
        """``m`` trains (or trained, or paused from) the current generation's plan. A lost, departed or
        standby member keeps the share and speed of a plan that no longer runs: shown, they would
        misstate the others' fractions of the batch."""
        return m.worker_id in self.generation_members and m.state in ("training", "paused", "finished")

    def status(self) -> dict:
        now = self.clock()
        planned = [m for m in self.members.values() if self._in_plan(m) and m.share]
        total = sum(m.share for m in planned) or 1.0
        return {
            "name": self.job.name, "status": self.phase.value, "reason": self.reason,
            "generation": self.generation, "step": self.step, "epoch": self.epoch,
            "epochs": self.job.train.epochs, "total_steps": self.total_steps, "loss": self.loss,
            "samples_per_s": self.samples_per_s, "target_workers": self.target_workers,
            "latest_checkpoint": self.latest_checkpoint, "run_dir": str(self.run.root),
            "summary": self.summary,
            "workers": [{"worker_id": m.worker_id, "host": m.host, "pid": m.pid, "state": m.state,
                         "rank": m.rank if m.state == "training" else None,
                         "share": m.share if m in planned else None,
                         "share_fraction": round(m.share / total, 4) if m in planned else None,
                         "step": m.step,
                         "samples_per_s": round(m.samples_per_s, 1) if self._in_plan(m) else None,
                         "last_seen_s": round(now - m.last_seen, 2)} for m in self.members.values()],
            "events": self.events[-20:],
        }
