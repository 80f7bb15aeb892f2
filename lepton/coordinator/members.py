"""What the controller knows of each registered worker (``Member``) and of a failure it has not yet
recovered from (``Incident``). Plain records: the controller and the planner write them, the views
read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..protocol import Resources
from . import balance
from .state import MemberState


@dataclass
class Member:
    worker_id: str
    host: str
    pid: int
    resources: Resources
    last_seen: float
    state: MemberState = MemberState.JOINING
    cause: str = "registered"  # why it is in ``state``
    step: int = 0  # steps completed by this replica
    samples_per_s: float = 0.0
    rank: Optional[int] = None
    share: Optional[float] = None
    generation: Optional[int] = None
    speed: Optional[float] = None  # samples per second of processor time at its current operating point
    speed_plan: Optional[tuple[Optional[int], int]] = None  # (generation, plan version) of that measurement
    # per step, smoothed: samples, busy s, compute s, fixed part of compute s, standard errors of busy
    # and compute s (Heartbeat.step_*)
    measured: tuple[float, ...] = (0.0,) * 6
    cost: Optional[balance.StepCost] = None  # from ``measured``
    capacity: float = 1.0  # cores it can count on in its generation (balance.capacities)
    plan_version: int = 0  # the share plan it has applied
    run_sent: bool = False  # it was told to start its generation (``plan`` answered ``run``)


@dataclass
class Incident:
    """A failure not yet recovered from: closed by the new generation's first completed step."""

    detected_by: str
    detected_at: float
    generation: Optional[int]
    step_before: int
    formed_at: Optional[float] = None

    def recovered(self, now: float, resumed_at: int, generation: Optional[int]) -> tuple[str, dict]:
        """The ``recovered`` event of this incident: its reason and details, once the generation that
        replaced the failed one completed a step (``resumed_at``: the step it started from)."""
        lost = max(0, self.step_before - resumed_at)
        formed = self.formed_at if self.formed_at is not None else now
        reason = (
            f"recovered from '{self.detected_by}' in {now - self.detected_at:.2f} s;"
            f" resumed at step {resumed_at}, {lost} completed step(s) lost"
        )
        return reason, {
            "detected_by": self.detected_by,
            "recovery_s": round(now - self.detected_at, 3),
            "regroup_s": round(formed - self.detected_at, 3),
            "resumed_at_step": resumed_at,
            "steps_lost": lost,
            "generation": generation,
        }


def comm_backend(device: str, members: list[Member]) -> str:
    """NCCL when every member trains on a GPU of its own, gloo otherwise (CPU, or a shared GPU)."""
    if device == "cpu":
        return "gloo"
    firsts = [m.resources.gpus[:1] for m in members]
    owned = {(m.host, f[0]) for m, f in zip(members, firsts) if f}
    return "nccl" if all(firsts) and len(owned) == len(firsts) else "gloo"
