"""The coordinator's controller: membership, generations and the run's phase, as a state machine.

A *generation* is one membership with its own process group. It ends when a member is lost (a
survivor's collective failed, the process exited, or its heartbeat timed out), a worker joins or
leaves, or a stop is requested. Ending it is agreed on the data plane: the controller raises a
``regroup`` flag in heartbeat replies, every worker puts it into the step's allreduce
(worker/step_control), and all of them see the reduced flag at the same step, finish that step and
pause (invariant 5). Survivors of a failure pause where their failed collective left them; they are
at most one step apart, and the most advanced one becomes rank 0 of the next generation and the
source of its state broadcast (invariant 3). No checkpoint is reloaded unless no live replica is left.

Inputs are the control-plane messages (register, heartbeat, plan, report), ``tick`` (time passing),
``process_exited`` (local supervision) and ``request_stop``. The controller does no I/O: the HTTP
server calls it under one lock; tests step it against fake workers with a fake clock. Its parts:
``state`` (phases and member states with their causes), ``planner`` (shares), ``failure_policy``
(what a failure leads to) and ``journal`` (observers that write the run directory). ``_transition``
is the only writer of the phase, and every transition is an event.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

from ..protocol import (
    AnyReport,
    CheckpointPayload,
    FinishedPayload,
    Generation,
    Heartbeat,
    HeartbeatResponse,
    PausedPayload,
    PlanResponse,
    RegisterRequest,
    Resources,
    StepPlan,
    typed_record,
)
from ..records import BestRecord, DecisionRecord, EvalRecord, TrainRecord
from ..spec import JobSpec
from ..storage.rundir import RunDir
from . import views
from .failure_policy import Action, FailureDecision, FailurePolicy
from .journal import Observer, run_journal
from .members import Incident, Member, comm_backend
from .planner import SharePlanner, assign_capacities, initial_shares
from .state import ControllerState, MemberState, Phase, Transition

# Once a generation is broken, a member still marked as training that has been silent this long is
# taken for dead (heartbeats come every 0.5 s from a thread independent of the training loop).
SUSPECT_SILENCE_S = 2.0

# keys of an event that a decision record's details may not replace
_EVENT_KEYS = {"time", "kind", "reason", "step"}


@dataclass
class Controller:
    job: JobSpec
    run: RunDir
    target_workers: int  # workers needed before the first generation
    train_rows: int = 0  # size of the training split (for total_steps)
    resume_checkpoint: Optional[dict] = None  # {"step": int, "path": str} from state.json
    previous_generation: Optional[int] = None  # on --resume: the generation state.json last recorded
    clock: Callable[[], float] = time.monotonic
    share_policy: Callable[[JobSpec, list[Member]], list[float]] = initial_shares
    observers: Optional[list[Observer]] = None  # default: the run directory's journal

    state: ControllerState = field(init=False)
    members: dict[str, Member] = field(default_factory=dict)
    generation: Optional[int] = None
    generation_members: list[str] = field(default_factory=list)
    generation_start_step: int = 0
    step: int = 0
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    samples_per_s: Optional[float] = None
    latest_checkpoint: Optional[dict] = None
    summary: Optional[dict] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    stop_requested: Optional[str] = None  # the cause of a stop under way
    checkpoint_from: Optional[str] = None  # worker asked to write its state as a checkpoint
    source_is_checkpoint: bool = True  # the current generation starts from a checkpoint file
    incidents: list[Incident] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    # errors reported by members of the current generation (worker id -> error): FailurePolicy.worker_error
    generation_errors: dict[str, str] = field(default_factory=dict)
    # before the first generation, where a launcher knows: how many workers can still come, and why
    # the others cannot (``workers_left``); None: any number may
    can_come: Optional[int] = None
    lost_at_start: str = ""

    def __post_init__(self) -> None:
        self.opened_at = self.clock()  # cluster.start_grace_s and start_timeout_s count from here
        self.state = ControllerState(Phase.WAITING, "waiting for the first workers", self.opened_at)
        if self.observers is None:
            self.observers = run_journal(self.run, self.clock)
        self.planner = SharePlanner(self.job, self.share_policy)
        self.failures = FailurePolicy(self.job.cluster)
        if self.train_rows:
            self.total_steps = -(-self.train_rows // self.job.train.batch_size) * self.job.train.epochs
        self.latest_checkpoint = self.resume_checkpoint
        if self.resume_checkpoint:
            self.step = int(self.resume_checkpoint["step"])
        self._persist()

    # --- views ---------------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.state.phase

    @property
    def reason(self) -> str:
        """Why the run is in its phase (shown as the status's ``reason``; final phases keep theirs)."""
        return self.state.cause if self.phase.final else ""

    @property
    def shares(self) -> list[float]:
        return self.planner.shares

    @property
    def step_plan(self) -> StepPlan:
        return self.planner.step_plan

    @property
    def plan_version(self) -> int:
        return self.planner.version

    @property
    def epoch(self) -> int:
        """Epochs completed, derived from the step (the last step of an epoch completes it)."""
        per_epoch = -(-self.train_rows // self.job.train.batch_size) if self.train_rows else 0
        return min(self.step // per_epoch, self.job.train.epochs) if per_epoch else 0

    def _generation_list(self) -> list[Member]:
        return [self.members[w] for w in self.generation_members]

    # --- inputs --------------------------------------------------------------------------------
    def register(self, req: RegisterRequest) -> str:
        wid = f"w{len(self.members)}-{uuid.uuid4().hex[:6]}"
        self.members[wid] = Member(wid, req.host, req.pid, req.resources, self.clock())
        self._event(
            "worker_registered",
            f"{wid} on {req.host} (pid {req.pid})",
            worker=wid,
            host=req.host,
            resources=req.resources.model_dump(),
        )
        return wid

    def heartbeat(self, hb: Heartbeat) -> HeartbeatResponse:
        m = self.members.get(hb.worker_id)
        if m is None and self._adoptable(hb):
            m = self._adopt(hb)
        if hb.records and m is not None and m.state != MemberState.LOST:  # a lost member's are stale
            self._take_metrics(hb.records)
        if m is None or m.state.gone or self.phase.final:
            return HeartbeatResponse(action="exit")
        m.last_seen = self.clock()
        m.samples_per_s = hb.samples_per_s
        current = hb.generation is not None and hb.generation == self.generation
        plan = None
        if current and m.state == MemberState.TRAINING:
            if hb.plan_version > self.planner.version and len(hb.shares) == self.planner.world:
                self.planner.follow(hb, self._generation_list())
            m.step = hb.step
            m.plan_version = hb.plan_version
            if hb.step_busy_s > 0:
                SharePlanner.measured(m, hb, self.generation)
            self.step = max(self.step, hb.step)
            if self.incidents and self.phase == Phase.RUNNING and hb.step > self.generation_start_step:
                self._recovered()
            self._maybe_replan()
            if m.plan_version < self.planner.version:
                plan = self.planner.step_plan
        regroup = self.phase == Phase.REGROUPING and m.state == MemberState.TRAINING and current
        return HeartbeatResponse(
            action="continue", regroup_generation=self.generation if regroup else None, plan=plan
        )

    def plan(self, worker_id: str) -> PlanResponse:
        """Answer a worker's request for what to do next: run a generation, checkpoint, wait or exit."""
        m = self.members.get(worker_id)
        if m is None or m.state.gone:
            return PlanResponse(action="exit", reason="not a member of this job (lost or left)")
        m.last_seen = self.clock()
        if self.phase.final:
            return PlanResponse(action="exit", reason=f"job {self.phase.value}")
        if m.state == MemberState.JOINING:  # its first plan request: model and data are loaded
            self._set_member_state(m, MemberState.STANDBY, "model and data loaded")
            self._on_ready(m)
        if self.checkpoint_from == worker_id:
            return PlanResponse(action="checkpoint", reason="save the live state before waiting or stopping")
        # a member that has not started its generation yet still does when a regroup began in the
        # meantime (a join, a stop, a loss): told to wait it would stay "training" for good, and the
        # others could not finish the rendezvous; started, it hears the regroup and pauses like them
        startable = self.phase == Phase.RUNNING or (self.phase == Phase.REGROUPING and not m.run_sent)
        if startable and m.state == MemberState.TRAINING and worker_id in self.generation_members:
            return PlanResponse(action="run", generation=self._generation_for(m))
        return PlanResponse(action="wait", reason=f"{self.phase.value}: {self._waiting_for()}")

    def write_refused(self, worker_id: str) -> str | None:
        """Why ``worker_id`` may not write into the run through the file API, or None if it may: a worker
        that was declared lost (a cut link that came back) or left is fenced off, so what it still
        holds (a checkpoint of a stale generation) never reaches the run."""
        m = self.members.get(worker_id)
        if m is None or m.state.gone:
            return f"{worker_id} is not a member of this job (lost or left): its writes are refused"
        if self.phase.final:
            return f"the job is {self.phase.value}"
        return None

    def report(self, r: AnyReport) -> None:
        """A worker's report, already validated by kind (protocol.py) and known to come from the
        worker it names (its credential, server.py). Only a current member's reports about its
        current generation count; any other is recorded as an event (``report_ignored``)."""
        m = self.members.get(r.worker_id)
        if m is None:
            return
        if m.state.gone and r.kind in ("paused", "finished", "failed"):
            return  # it was told to exit: taking it back would count a dead worker as alive
        m.last_seen = self.clock()
        if r.kind == "metrics":
            self._take_metrics(r.payload.records)
        elif r.kind == "checkpoint":
            self._on_checkpoint(m, r.payload)
        elif r.kind == "finished":
            self._on_finished(m, r.payload)
        elif r.kind == "paused":
            self._on_paused(m, r.payload)
        elif r.kind == "failed":
            self._on_failed(m, r.payload.error, r.payload.generation)

    def tick(self) -> None:
        """Time passes: silent members are lost; a wait for workers may reach its deadline."""
        if self.phase.final:
            return
        self._persist(progress=True)  # a step that metrics reports left unwritten
        now = self.clock()
        timeout = self.job.cluster.heartbeat_timeout_s
        for m in list(self.members.values()):
            if m.state.gone or m.state == MemberState.FINISHED:
                continue
            silent = now - m.last_seen
            if silent > timeout:
                self._lose(
                    m, f"heartbeat timeout ({silent:.1f} s silent, cluster.heartbeat_timeout_s={timeout:g})"
                )
            elif (
                self.phase == Phase.REGROUPING
                and m.state == MemberState.TRAINING
                and silent > SUSPECT_SILENCE_S
            ):
                self._lose(m, f"silent for {silent:.1f} s while its generation regrouped")
        if self.phase == Phase.WAITING and self.started_at is not None:
            decision = self.failures.too_few_workers(
                len(self._alive()),
                now - self.state.since,
                (self.latest_checkpoint or {}).get("step", 0),
                checkpointing=self.checkpoint_from is not None,
            )
            if decision.action == Action.FAIL:
                self._carry_out(decision)
        elif self.phase == Phase.WAITING and self.started_at is None:
            self._advance()  # the start-up grace period or deadline may have passed

    def process_exited(self, pid: int, code: int) -> None:
        """A locally supervised worker process ended."""
        for m in self.members.values():
            if m.pid == pid and not m.state.gone and m.state != MemberState.FINISHED:
                self._lose(m, f"process exited with code {code}")

    def workers_left(self, can_come: int, lost: str) -> None:
        """Before the first generation: only ``can_come`` workers can still come (the launcher saw the
        others exit; ``lost`` says which and how). The first generation waits for no more."""
        if self.started_at is None and not self.phase.final:
            self.can_come, self.lost_at_start = can_come, lost
            self._event("start_up_loss", lost, can_come=can_come)
            self._advance()

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

    def note(self, kind: str, reason: str, **details: Any) -> None:
        """An event from outside the controller (e.g. the launcher restarted a local worker)."""
        self._event(kind, reason, **details)

    def stop_now(self, reason: str) -> None:
        if not self.phase.final:
            self._end(Phase.STOPPED, reason)

    def fail(self, reason: str) -> None:
        if not self.phase.final:
            self._end(Phase.FAILED, reason)

    # --- the one writer of the phase ------------------------------------------------------------
    def _transition(self, phase: Phase, kind: str, cause: str, **details: Any) -> None:
        """Enter ``phase`` because of ``cause``; the change is recorded as an event of ``kind`` with
        ``from`` and ``to``, and state.json follows."""
        t = Transition(self.phase, phase, kind, cause, details)
        self.state = ControllerState(phase, cause, self.clock())
        self._event(t.kind, t.cause, **{"from": t.previous.value, "to": t.current.value}, **t.details)
        self._persist()

    def _set_member_state(self, m: Member, state: MemberState, cause: str) -> None:
        m.state, m.cause = state, cause

    def _carry_out(self, decision: FailureDecision, **details: Any) -> None:
        if decision.action == Action.REGROUP:
            self._regroup(decision.reason, **details)
        elif decision.action == Action.FAIL:
            self.fail(decision.reason)

    # --- transitions ---------------------------------------------------------------------------
    def _adoptable(self, hb: Heartbeat) -> bool:
        """A worker of the generation that was training when this coordinator's predecessor died
        (``--resume`` on a live run): the data plane went on without us, so take it back as it is."""
        return (
            hb.generation is not None
            and hb.generation == self.previous_generation
            and hb.rank is not None
            and hb.world is not None  # the protocol keeps rank < world
            and hb.state == MemberState.TRAINING
            and self.phase in (Phase.WAITING, Phase.RUNNING)
            and self.generation in (None, hb.generation)
            # a second adoptee trains in the same generation as the first: the same world, a free rank
            and (self.generation is None or hb.world == self.planner.world)
            and all(self.members[w].rank != hb.rank for w in self.generation_members)
        )

    def _adopt(self, hb: Heartbeat) -> Member:
        now = self.clock()
        m = Member(
            hb.worker_id,
            hb.host,
            hb.pid,
            hb.resources or Resources(),
            now,
            state=MemberState.TRAINING,
            cause="adopted: trained on while the coordinator was down",
            step=hb.step,
            rank=hb.rank,
            generation=hb.generation,
            plan_version=hb.plan_version,
            run_sent=True,
        )
        self.members[hb.worker_id] = m
        # the workers train with the predecessor's last plan, which their heartbeats carry: a re-plan
        # starts from those shares and is numbered after it, or they would not apply it
        first = self.generation is None
        if first:
            self.generation = hb.generation
            # _adoptable: a member training in a generation; its heartbeats carry the generation's size
            self.planner.adopt(cast(int, hb.generation), cast(int, hb.world))
            self.started_at, self.source_is_checkpoint = now, False
        self.generation_members = sorted(
            self.generation_members + [m.worker_id], key=lambda w: cast(int, self.members[w].rank)
        )
        m.share = self.planner.share_of(hb.rank) if hb.rank is not None else None
        if len(hb.shares) == self.planner.world and hb.plan_version >= self.planner.version:
            self.planner.follow(hb, self._generation_list())
        if len(self.generation_members) == self.planner.world:  # all back: capacities as at formation
            assign_capacities(self.job, self._generation_list())
        self.planner.version = max(self.planner.version, hb.plan_version)
        self.step = max(self.step, hb.step)
        self._event(
            "worker_adopted",
            f"{m.worker_id} (rank {hb.rank} of generation {hb.generation}) kept training"
            f" while the coordinator was down; adopted at step {hb.step}",
            worker=m.worker_id,
        )
        if first and self.phase != Phase.RUNNING:
            self._transition(Phase.RUNNING, "generation_adopted", f"generation {hb.generation} adopted")
        self._persist()
        return m

    def _on_ready(self, m: Member) -> None:
        training = sum(1 for x in self.members.values() if x.state == MemberState.TRAINING)
        if self.phase == Phase.RUNNING and training < self._max_workers():
            self._regroup(f"worker {m.worker_id} joined")
        else:
            self._advance()

    def _generation_for(self, m: Member) -> Generation:
        m.run_sent = True
        resume = None
        if m.rank == 0 and self.source_is_checkpoint and self.latest_checkpoint:
            resume = self.latest_checkpoint["path"]
        return Generation(
            id=self.generation,
            rank=m.rank,
            world=len(self.generation_members),
            shares=self.planner.generation_plan.shares,
            members=self.generation_members,
            start_step=self.generation_start_step,
            resume_checkpoint=resume,
            backend=self._backend(),
        )

    def _take_metrics(self, lines: list[dict]) -> None:
        """metrics.jsonl records from a member (in its heartbeat, or a ``metrics`` report). Every line
        is journaled as sent; a line this version cannot parse is not acted on."""
        for obs in self.observers or ():
            obs.on_records(lines)
        for line in lines:
            rec = typed_record(line)  # None: journaled as sent, not acted on
            if isinstance(rec, TrainRecord):
                self.step = max(self.step, rec.step)
                self.loss, self.samples_per_s = rec.loss, rec.samples_per_s
            elif isinstance(rec, BestRecord):
                self._event(
                    "best",
                    f"best {rec.metric} so far: {rec.value:.6g} at step {rec.step}",
                    step=rec.step,
                    value=rec.value,
                    metric=rec.metric,
                )
            elif isinstance(rec, DecisionRecord):  # a policy's decision, taken on every worker
                details = {k: v for k, v in rec.details.items() if k not in _EVENT_KEYS}
                self._event(rec.decision, rec.reason, step=rec.step, **details)
            elif isinstance(rec, EvalRecord):  # after an evaluation: a re-plan point too
                self._maybe_replan()
        self._persist(progress=True)

    def _ignored(self, m: Member, kind: str, why: str, **details: Any) -> None:
        self._event(
            "report_ignored", f"{kind} from {m.worker_id} ignored: {why}", worker=m.worker_id, **details
        )

    def _member_of_generation(self, m: Member, generation: Optional[int]) -> bool:
        """``m`` is in the current generation and the report is about it (or names none)."""
        return (
            self.generation is not None
            and m.worker_id in self.generation_members
            and m.generation == self.generation
            and generation in (None, self.generation)
        )

    def _on_checkpoint(self, m: Member, p: CheckpointPayload) -> None:
        # written by rank 0 of the current generation, or by the worker asked for the live state
        if not (self.checkpoint_from == m.worker_id or self._member_of_generation(m, None)):
            self._ignored(m, "checkpoint", "not a member of the current generation", step=p.step)
            return
        if not self.latest_checkpoint or p.step >= self.latest_checkpoint["step"]:
            self.latest_checkpoint = {"step": p.step, "path": p.path}
        self._event("checkpoint", f"checkpoint at step {p.step} by {m.worker_id}", step=p.step, path=p.path)
        # a background checkpoint of an earlier step can land after the request: only one of the
        # live state (the step the worker paused at) fulfils it
        if self.checkpoint_from == m.worker_id and p.step >= m.step:
            self.checkpoint_from = None
        self._persist()
        self._advance()

    def _on_finished(self, m: Member, p: FinishedPayload) -> None:
        if not self._member_of_generation(m, p.generation) or m.state not in (
            MemberState.TRAINING,
            MemberState.PAUSED,
            MemberState.FINISHED,
        ):
            self._ignored(m, "finished", "not a member of the current generation", generation=p.generation)
            return
        self._set_member_state(m, MemberState.FINISHED, "completed the run")
        if p.step is not None:
            m.step = p.step
        if p.summary:
            self.summary = p.summary
        # rank 0's summary comes after the final evaluation, a collective every rank took part in,
        # and after the model was written: once no member is still training the job is done, even
        # if a regroup (a stop, a join, a loss) began meanwhile and made the members that had
        # finished paused ones
        if (
            self.summary is not None
            and len(self.generation_members) == self.planner.world
            and all(x.state != MemberState.TRAINING for x in self._generation_list())
        ):
            if not self.phase.final:
                self._complete()
        else:
            self._advance()

    def _on_paused(self, m: Member, p: PausedPayload) -> None:
        why = p.reason
        if why == "leaving" and p.generation is None and m.state != MemberState.TRAINING:
            pass  # it leaves between generations (standby, paused, joining): its own state only
        elif not self._member_of_generation(m, p.generation) or m.state not in (
            MemberState.TRAINING,
            MemberState.PAUSED,
        ):
            # a pause about an older generation, or from a worker that is not in this one
            self._ignored(m, "paused", "not about the current generation", generation=p.generation)
            return
        m.step = p.step
        if why == "leaving":
            self._set_member_state(m, MemberState.LEFT, "left gracefully")
            self._event("worker_left", f"{m.worker_id} left gracefully at step {m.step}", worker=m.worker_id)
        else:
            self._set_member_state(m, MemberState.PAUSED, f"paused: {why}")
        if why == "collective_error":
            current = self.phase == Phase.RUNNING and p.generation == self.generation
            error = p.error
            decision = self.failures.collective_error(m.worker_id, current)
            if decision.action == Action.REGROUP:
                self._open_incident(f"collective error reported by {m.worker_id}: {error}")
                self._regroup(
                    f"a collective failed in generation {self.generation}",
                    worker=m.worker_id,
                    error=error[:300],
                )
        elif why == "leaving" and self.phase == Phase.RUNNING and m.worker_id in self.generation_members:
            self._regroup(f"worker {m.worker_id} left")
        self._advance()

    def _on_failed(self, m: Member, error: str, generation: Optional[int]) -> None:
        """A worker reports an error of its own and exits: it is lost. What that means for the run is
        the policy's (``FailurePolicy.worker_error``): a member of the current generation counts
        towards "every member failed"; anyone else's error changes nothing beyond its own loss."""
        member = self._member_of_generation(m, generation) and m.state in (
            MemberState.TRAINING,
            MemberState.PAUSED,
            MemberState.FINISHED,
        )
        if member:
            self.generation_errors[m.worker_id] = error
        running = member and self.phase == Phase.RUNNING
        self._set_member_state(m, MemberState.LOST, "reported an error")
        if self.checkpoint_from == m.worker_id:
            self.checkpoint_from = None
        self._event(
            "worker_error", f"{m.worker_id} reported an error: {error[:300]}", worker=m.worker_id, step=m.step
        )
        decision = self.failures.worker_error(
            m.worker_id,
            error,
            dict(self.generation_errors) if member else {m.worker_id: error},
            # the members that could still report: a member gone for another cause (killed, silent,
            # left) no longer counts towards "every member"
            [
                w
                for w in self.generation_members
                if w in self.generation_errors or not self.members[w].state.gone
            ]
            if member
            else [m.worker_id],
            in_running_generation=running,
        )
        if decision.action == Action.REGROUP:
            self._open_incident(f"{m.worker_id}: reported an error")
        self._carry_out(decision, worker=m.worker_id)
        self._advance()

    def _lose(self, m: Member, how: str) -> None:
        running = m.worker_id in self.generation_members and m.state in (
            MemberState.TRAINING,
            MemberState.PAUSED,
        )
        self._set_member_state(m, MemberState.LOST, how)
        if self.checkpoint_from == m.worker_id:
            self.checkpoint_from = None
        self._event(
            "worker_lost", f"{m.worker_id} lost: {how}", worker=m.worker_id, detected_by=how, step=m.step
        )
        decision = self.failures.member_lost(m.worker_id, how, running and self.phase == Phase.RUNNING)
        if decision.action == Action.REGROUP:
            self._open_incident(f"{m.worker_id}: {how}")
        self._carry_out(decision)
        self._advance()

    def _open_incident(self, detected_by: str) -> None:
        self.incidents.append(Incident(detected_by, self.clock(), self.generation, self.step))

    def _recovered(self) -> None:
        for inc in self.incidents:
            reason, details = inc.recovered(self.clock(), self.generation_start_step, self.generation)
            self._event("recovered", reason, **details)
        self.incidents = []

    def _maybe_replan(self) -> None:
        """A re-plan point (a heartbeat, an evaluation): the planner decides; the plan goes out in
        the reply to this heartbeat and to any later one from a member still at the old plan."""
        if self.phase != Phase.RUNNING:
            return
        change = self.planner.consider(self._generation_list(), self.step)
        if change is None:
            return
        self._event(
            "plan",
            change.reason(),
            generation=self.generation,
            step=self.step,
            **change.details(),
            workers=self.generation_members,
        )
        self._persist()

    def _regroup(self, reason: str, **details: Any) -> None:
        if self.phase != Phase.RUNNING:
            return
        for m in self._generation_list():  # a finished replica holds the final state: reuse it
            if m.state == MemberState.FINISHED:
                self._set_member_state(m, MemberState.PAUSED, "finished, then its generation regrouped")
        self._transition(Phase.REGROUPING, "regroup", reason, generation=self.generation, **details)

    def _advance(self) -> None:
        """Move on once the current generation has wound down (or nothing is running)."""
        if self.phase == Phase.RUNNING or self.phase.final:
            return
        if self.phase == Phase.REGROUPING and any(
            m.state == MemberState.TRAINING for m in self._generation_list()
        ):
            return  # still waiting for members to pause
        if self.checkpoint_from is not None:
            return  # a checkpoint of the live state is being written
        paused = sorted(
            (m for m in self.members.values() if m.state == MemberState.PAUSED), key=lambda m: -m.step
        )
        best = paused[0] if paused else None
        if best is not None and self.latest_checkpoint and best.step < self.latest_checkpoint["step"]:
            # no live replica got as far as the checkpoint (they paused before the state broadcast
            # of a generation that started from it, so they hold their initial state): the checkpoint
            # is the most advanced state, and starting from a replica would lose its steps
            best = None
        behind = best is not None and (
            not self.latest_checkpoint or self.latest_checkpoint["step"] < best.step
        )
        if self.stop_requested:
            if behind and best is not None:
                self.checkpoint_from = best.worker_id
                return
            self._end(Phase.STOPPED, self.stop_requested)
            return
        alive = self._alive()
        if self.started_at is None:  # the first generation: the start-up rule decides
            start = self.failures.start_up(
                len(alive),
                self.target_workers,
                self.clock() - self.opened_at,
                self.can_come,
                self.lost_at_start,
            )
            if start.action == Action.START:
                self._form_generation(alive, best, started_because=start.reason)
            elif start.action == Action.FAIL:
                self.fail(start.reason)
            return
        if len(alive) >= max(1, self.job.cluster.min_workers):
            self._form_generation(alive, best)
            return
        if self.phase == Phase.WAITING:
            return  # already waiting (before the first generation, or since ``state.since``)
        # the wait starts now (waited 0 s): the policy's WAIT decision names why
        checkpoint_step = (self.latest_checkpoint or {}).get("step", 0)
        decision = self.failures.too_few_workers(len(alive), 0.0, checkpoint_step, checkpointing=False)
        self._transition(Phase.WAITING, "waiting", f"{decision.reason}: training paused")
        if behind and best is not None:
            self.checkpoint_from = best.worker_id  # keep the live state safe while waiting

    def _form_generation(self, alive: list[Member], source: Optional[Member], **details: Any) -> None:
        rest = [m for m in alive if m is not source]
        order = list(self.members)
        rest.sort(key=lambda m: (m.state != MemberState.PAUSED, -m.step, order.index(m.worker_id)))
        chosen = (([source] if source else []) + rest)[: self._max_workers()]
        last = self.generation if self.generation is not None else self.previous_generation
        self.generation = 0 if last is None else last + 1
        self.generation_members = [m.worker_id for m in chosen]
        self.generation_errors = {}
        # the state comes from the most advanced live replica, or from the checkpoint if none is left
        self.source_is_checkpoint = source is None
        if source is not None:
            self.generation_start_step = source.step
        else:
            self.generation_start_step = self.latest_checkpoint["step"] if self.latest_checkpoint else 0
        shares = self.planner.start(self.generation, chosen, self.generation_start_step)
        for rank, m in enumerate(chosen):
            self._set_member_state(m, MemberState.TRAINING, f"rank {rank} of generation {self.generation}")
            m.rank, m.generation = rank, self.generation
            m.step, m.run_sent = self.generation_start_step, False
        self.step = self.generation_start_step  # back to a checkpoint's step if that is the source
        for inc in self.incidents:
            if inc.formed_at is None:
                inc.formed_at = self.clock()
        if self.started_at is None:
            self.started_at = self.clock()
        self._transition(
            Phase.RUNNING,
            "generation",
            f"generation {self.generation} with {len(chosen)} worker(s)"
            f" from step {self.generation_start_step}",
            generation=self.generation,
            members=self.generation_members,
            shares=shares,
            start_step=self.generation_start_step,
            backend=self._backend(),
            state_from="checkpoint" if source is None else source.worker_id,
            **details,
        )

    def _complete(self) -> None:
        summary = dict(self.summary or {})
        self.ended_at = self.clock()
        wall = self.ended_at - (self.started_at if self.started_at is not None else self.ended_at)
        steps = summary.get("steps")
        summary.update(
            status="completed",
            workers=len(self.generation_members),
            wall_s=round(wall, 3),
            members=self._member_costs(),
        )
        self.summary = summary
        if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0:
            self.step = steps
        for obs in self.observers or ():
            obs.on_summary(summary)
        self._end(Phase.COMPLETED, f"training completed at step {self.step}")

    def _end(self, phase: Phase, reason: str) -> None:
        self.ended_at = self.clock()
        self._transition(phase, phase.value, reason)
        for obs in self.observers or ():
            obs.close()

    # --- helpers -------------------------------------------------------------------------------
    def _event(self, kind: str, reason: str, **details: Any) -> None:
        ev = {"time": time.time(), "kind": kind, "reason": reason, **details}
        self.events.append(ev)
        for obs in self.observers or ():
            obs.on_event(ev)

    def _persist(self, progress: bool = False) -> None:
        """Tell the observers what state.json should hold (``journal.StateFile`` decides when to write)."""
        state = views.persisted_state(self)
        for obs in self.observers or ():
            obs.on_state(state, progress)

    def _backend(self) -> str:
        return comm_backend(self.job.cluster.device, self._generation_list())

    def _member_costs(self) -> list[dict]:
        return views.member_costs(self._generation_list())

    def _alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.state.alive]

    def _max_workers(self) -> int:
        """At most ``cluster.max_workers`` train (the spec keeps it within the batch), and never more
        than the global batch has samples (a rank with none would measure no speed): the others wait
        as standby."""
        return self.job.cluster.max_workers or self.job.train.batch_size

    def _waiting_for(self) -> str:
        if self.phase == Phase.REGROUPING:
            return "the current generation to pause"
        needed = self.job.cluster.min_workers
        if self.started_at is None:
            needed = self.target_workers if self.can_come is None else min(self.target_workers, self.can_come)
        return f"{len(self._alive())}/{needed} workers"

    def status(self) -> dict:
        """The run as ``GET /v1/status`` shows it (``views.status``)."""
        return views.status(self)
