"""Where a share of the global batch is planned: the controller's ``SharePlanner``.

It holds the current generation's plans (version 0 at formation, then one per re-plan) and each
member's measured step cost, and decides, from ``balance``'s pure functions, when a re-plan is worth
issuing. It never talks to the network and never writes a file: the controller calls it at its
decision points (a heartbeat that completes a measurement window, an evaluation) and turns a
``PlanChange`` into an event and a ``StepPlan`` in heartbeat replies. The worker that receives the
plan carries it to the others in its next step's gradient reduction, after which every member applies
it at the same step (invariant 5). Shares never change the math (invariant 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, cast

from ..protocol import Heartbeat, StepPlan
from ..spec import JobSpec
from . import balance
from .members import Member


def initial_shares(job: JobSpec, members: list[Member]) -> list[float]:
    """Shares of a new generation: the spec's fixed ``cluster.shares`` (``ClusterSpec.fixed_shares``);
    with balancing off, equal; else proportional to effective speed when every member's is known from
    an earlier generation, or to capacity (its resources) when not."""
    fixed = job.cluster.fixed_shares(len(members))
    if fixed:
        return fixed
    if job.cluster.balance == "off" or not members:
        return [1.0] * len(members)
    if all(m.cost for m in members):
        return balanced_shares(job, members)
    return [round(s, 4) for s in balance.normalise([m.capacity for m in members])]


def balanced_shares(
    job: JobSpec, members: list[Member], current: Optional[list[float]] = None
) -> list[float]:
    """Shares that equalise the members' step times, from their costs with the differences within
    measurement noise taken out (``balance.comparable``); none under ``balance.FLOOR`` of its capacity
    share, and from ``current`` shares (a re-plan), none shrinks by more than ``balance.SHRINK`` at
    once."""
    batch = job.train.batch_size
    caps = [m.capacity for m in members]
    minimum = balance.floor_limits(caps, batch)
    if current:
        minimum = [max(a, b) for a, b in zip(minimum, balance.shrink_limits(current, batch))]
    costs = balance.comparable([cast(balance.StepCost, m.cost) for m in members])
    return [round(s, 4) for s in balance.target_shares(costs, caps, batch, minimum)]


def assign_capacities(job: JobSpec, members: list[Member]) -> None:
    """Cores each member can count on in its generation (``balance.capacities``)."""
    gpus = job.cluster.device != "cpu"  # a worker told to train on its CPU is a CPU worker
    placements = [
        (m.host, m.resources.cpu_list, m.resources.threads, gpus and bool(m.resources.gpus)) for m in members
    ]
    for m, cap in zip(members, balance.capacities(placements)):
        m.capacity = cap


@dataclass(frozen=True)
class PlanChange:
    """A re-plan worth issuing, with what it was decided from (for the ``plan`` event)."""

    shares: list[float]
    version: int
    speeds: list[float]
    fixed_ms: list[float]
    per_sample_us: list[float]
    capacities: list[float]
    per_sample_err: list[float] = field(default_factory=list)  # relative standard errors

    def reason(self) -> str:
        return (
            f"shares {self.shares} for speeds {[round(s) for s in self.speeds]} samples/s; step cost"
            f" {self.fixed_ms} ms + n x {self.per_sample_us} us (ideal gain over equal shares"
            f" {balance.ideal_gain(self.speeds):.2f}x)"
        )

    def details(self) -> dict:
        return {
            "version": self.version,
            "speeds": [round(s, 1) for s in self.speeds],
            "fixed_ms": self.fixed_ms,
            "per_sample_us": self.per_sample_us,
            "capacities": self.capacities,
            "per_sample_err": self.per_sample_err,
            "shares": self.shares,
        }


def _empty_plan() -> StepPlan:
    return StepPlan(version=0, shares=[])


@dataclass
class SharePlanner:
    """The share plans of the current generation. ``version`` counts the plans issued within it;
    ``step_plan`` is the latest, ``generation_plan`` its version 0 (what a member starts with)."""

    job: JobSpec
    share_policy: Callable[[JobSpec, list[Member]], list[float]] = initial_shares
    generation: Optional[int] = None
    world: int = 0
    shares: list[float] = field(default_factory=list)
    step_plan: StepPlan = field(default_factory=_empty_plan)
    generation_plan: StepPlan = field(default_factory=_empty_plan)
    version: int = 0
    considered_at: int = 0  # step at which the last re-plan was considered
    settled: bool = False  # the last consideration kept the shares
    guessed: bool = False  # the generation started from capacity-based shares

    def start(self, generation: int, members: list[Member], start_step: int) -> list[float]:
        """A new generation of ``members`` (in rank order): version 0 from ``share_policy``. Its first
        re-plan is due as soon as every member has measured a full window."""
        assign_capacities(self.job, members)
        self.generation, self.world = generation, len(members)
        self.shares = self.share_policy(self.job, members)
        self.guessed = not all(m.cost for m in members)  # from capacities: no measured costs yet
        self.version = 0
        self.step_plan = self.generation_plan = StepPlan(version=0, shares=self.shares, generation=generation)
        self.considered_at, self.settled = start_step, False
        for m, share in zip(members, self.shares):
            m.share, m.plan_version = share, 0
        return self.shares

    def adopt(self, generation: int, world: int) -> None:
        """A generation that trained on while no coordinator ran (``--resume`` of a live run): equal
        shares until a member's heartbeat says which plan it trains with (``follow``)."""
        self.generation, self.world = generation, world
        self.shares = [1.0] * world
        self.step_plan = self.generation_plan = StepPlan(version=0, shares=self.shares, generation=generation)

    def follow(self, hb: Heartbeat, members: list[Member]) -> None:
        """A member trains with a newer plan than this coordinator issued (its predecessor's last,
        applied after an adoption): take it as the current plan, or re-plans would wait for ever for
        the members to be at ``version``."""
        self.version = hb.plan_version
        self.shares = list(hb.shares)
        self.step_plan = StepPlan(version=hb.plan_version, shares=self.shares, generation=self.generation)
        for m in members:
            m.share = self.shares[m.rank] if m.rank is not None and m.rank < len(self.shares) else None

    def share_of(self, rank: int) -> Optional[float]:
        return self.shares[rank] if rank < len(self.shares) else None

    @staticmethod
    def measured(m: Member, hb: Heartbeat, generation: Optional[int]) -> None:
        """A full window of ``m``'s steps at its plan, smoothed within the plan; at another plan it is
        another operating point (bigger shares amortise the fixed cost), and replaces the old one."""
        point = (
            hb.step_samples,
            hb.step_busy_s,
            hb.step_compute_s,
            hb.step_compute_fixed_s,
            hb.step_busy_err_s,
            hb.step_compute_err_s,
        )
        at = (generation, hb.plan_version)
        m.measured = point if m.speed_plan != at else tuple(map(balance.smooth, m.measured, point))
        samples, busy, compute, compute_fixed, busy_err, compute_err = m.measured
        m.cost = balance.StepCost.measured(
            samples, busy, compute, compute_fixed, m.cost, busy_err=busy_err, compute_err=compute_err
        )
        m.speed, m.speed_plan = m.measured[0] / m.measured[1], at

    def balancing(self) -> bool:
        return self.job.cluster.balance == "on" and self.job.cluster.fixed_shares(self.world) is None

    def replan_step(self) -> int:
        """From which step the next re-plan is considered: while the plan is unsettled (a generation's
        first, or the last consideration changed the shares), as soon as every member has measured the
        current plan — a full window is spacing enough, and waiting longer is steps at worse shares
        (with 20 steps between considerations, three plans took until step ~60 of the benchmark's 353);
        once settled, every ``cluster.rebalance_every_steps``."""
        return self.considered_at + (self.job.cluster.rebalance_every_steps if self.settled else 0)

    def consider(self, members: list[Member], step: int) -> Optional[PlanChange]:
        """The balancing decision point: from ``replan_step``, once every member applied the last plan
        and measured it, shares follow the measured step costs (with hysteresis). Returns the plan
        issued, which is also the new ``step_plan``, or None."""
        if len(members) < self.world or any(m.plan_version != self.version for m in members):
            return None  # a member still to be adopted, or a plan still to be applied
        if not (
            self.balancing()
            and step >= self.replan_step()
            and all(m.speed_plan == (self.generation, self.version) for m in members)
        ):
            return None
        self.considered_at = step
        costs = [cast(balance.StepCost, m.cost) for m in members]  # every member measured
        caps = [m.capacity for m in members]
        # the first plan after shares guessed from capacities may move anywhere; every other one
        # only within balance.SHRINK of the current shares
        free = self.version == 0 and self.guessed
        current = self.step_plan.shares
        target = balanced_shares(self.job, members, None if free else current)
        # judged with the costs the target came from: noise taken out (balance.comparable)
        batch = self.job.train.batch_size
        new = balance.propose(current, target, balance.comparable(costs), caps, batch)
        self.settled = new is None
        if new is None or new == current:
            return None
        change = PlanChange(
            shares=new,
            version=self.version + 1,
            speeds=[(m.speed or 0.0) * m.capacity for m in members],
            fixed_ms=[round(m.cost.fixed * 1e3, 3) for m in members if m.cost],
            per_sample_us=[round(m.cost.per_sample * 1e6, 3) for m in members if m.cost],
            capacities=[round(m.capacity, 4) for m in members],
            per_sample_err=[round(c.per_sample_err, 3) for c in costs],
        )
        self.version += 1
        self.step_plan = StepPlan(version=self.version, shares=new, generation=self.generation)
        self.shares = new
        for m, share in zip(members, new):
            m.share = share
        return change
