"""Read-only views of the controller for the status API, the console and the summary: the running
generation's members with their shares, speeds and step costs."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .members import Member
from .state import MemberState

if TYPE_CHECKING:  # annotations only: the controller imports this module
    from .controller import Controller

# the states in which a member trains, trained or paused from the current generation's plan
_IN_PLAN = (MemberState.TRAINING, MemberState.PAUSED, MemberState.FINISHED)


def in_plan(ctrl: Controller, m: Member) -> bool:
    """``m`` trains (or trained, or paused from) the current generation's plan. A lost, departed or
    standby member keeps the share and speed of a plan that no longer runs: shown, they would
    misstate the others' fractions of the batch."""
    return m.worker_id in ctrl.generation_members and m.state in _IN_PLAN


def member_costs(members: list[Member]) -> list[dict]:
    """Members at their last measured operating point: share, effective speed (samples per second of
    wall time, capacity included) and step cost."""
    total = sum(m.share or 0.0 for m in members) or 1.0
    return [
        {
            "worker": m.worker_id,
            "share": round((m.share or 0.0) / total, 4),
            "capacity": round(m.capacity, 4),
            "speed": round(m.speed * m.capacity, 1) if m.speed else None,
            "fixed_ms": round(m.cost.fixed * 1e3, 3) if m.cost else None,
            "per_sample_us": round(m.cost.per_sample * 1e6, 3) if m.cost else None,
        }
        for m in members
    ]


def status(ctrl: Controller) -> dict:
    now = ctrl.clock()
    planned = [m for m in ctrl.members.values() if in_plan(ctrl, m) and m.share]
    total = sum(m.share or 0.0 for m in planned) or 1.0
    return {
        "name": ctrl.job.name,
        "status": ctrl.phase.value,
        "reason": ctrl.reason,
        "generation": ctrl.generation,
        "step": ctrl.step,
        "epoch": ctrl.epoch,
        "epochs": ctrl.job.train.epochs,
        "total_steps": ctrl.total_steps,
        "loss": ctrl.loss,
        "samples_per_s": ctrl.samples_per_s,
        "target_workers": ctrl.target_workers,
        "latest_checkpoint": ctrl.latest_checkpoint,
        "run_dir": ctrl.run.where(),
        "summary": ctrl.summary,
        "workers": [_worker(ctrl, m, m in planned, total, now) for m in ctrl.members.values()],
        "events": ctrl.events[-20:],
    }


def _worker(ctrl: Controller, m: Member, planned: bool, total: float, now: float) -> dict:
    return {
        "worker_id": m.worker_id,
        "host": m.host,
        "pid": m.pid,
        "state": m.state.value,
        "cause": m.cause,
        "rank": m.rank if m.state == MemberState.TRAINING else None,
        "share": m.share if planned else None,
        "share_fraction": round(m.share / total, 4) if planned and m.share else None,
        "step": m.step,
        "samples_per_s": round(m.samples_per_s, 1) if in_plan(ctrl, m) else None,
        "last_seen_s": round(now - m.last_seen, 2),
    }


def persisted_state(ctrl: Controller) -> dict:
    """What state.json holds (``journal.StateFile`` writes it)."""
    # until a member is adopted or a generation formed, the predecessor's generation (a further
    # --resume needs it)
    generation = ctrl.generation if ctrl.generation is not None else ctrl.previous_generation
    return {
        "status": ctrl.phase.value,
        "reason": ctrl.reason,
        "name": ctrl.job.name,
        "generation": generation,
        "step": ctrl.step,
        "epoch": ctrl.epoch,
        "total_steps": ctrl.total_steps,
        "latest_checkpoint": copy.deepcopy(ctrl.latest_checkpoint),
        "workers": len(ctrl.generation_members),
    }
