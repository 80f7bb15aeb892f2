"""Heterogeneity-aware shares: each worker's part of the global batch follows its measured cost.

A worker's step costs it ``fixed + n × per_sample`` seconds of *processor time* for n samples
(``StepCost``): the fixed part is what every replica pays whatever its share (optimizer update,
reduction work, the training loop's own bookkeeping, the per-operation dispatch of a forward/backward
pass), the per-sample part is the rest of its compute window. Workers measure both over a window of
steps at each share plan (worker/meter.py), and each worker's *capacity* (the cores it can count on,
from the placement it registered with) turns processor time into wall time. Shares are chosen so that
every worker's step ends at the same time (``target_shares``); each
re-plan uses costs measured at the current shares, so the plan converges on the shares whose steps do
end together. Processor time, not wall time: two workers pinned to one core that take turns would each
see full-speed wall times, yet together they only get one core. The policy is pure functions so the
coordinator can call them at its decision points and tests can drive them with made-up numbers. Shares
never change the math (invariant 1): any split of a global batch gives the same update.

Measurements are noisy, and the noise is not neutral: the per-sample cost is measured at the worker's own
share, so an error in the fixed part, divided by a smaller share, makes a worker with less look slower and
get less still (issue 25: identical workers at 2.6% / 97.4%; a worker slowed for a moment kept one sample
of 256 for good). So costs carry their errors, costs that noise cannot tell apart are one cost
(``pooled``, ``comparable``), and no share falls under ``FLOOR`` of what equal speeds would give it
(``floor_limits``), where its cost would stop being measurable.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

SMOOTHING = 0.5  # weight of a new measurement in the coordinator's moving average (within a plan)
HYSTERESIS = 0.03  # re-plan only when the measured costs predict a step more than 3% faster ...
MOVE = (0.03, 0.25)  # ... and some share moves by more than 3% of the batch or a quarter of itself
RELIABLE = 0.3  # a per-sample cost is measured only where it is this part of the compute window
SHRINK = 0.5  # a re-plan leaves every worker at least this part of its current share
FLOOR = 0.25  # ... and at least this part of its capacity share (what equal speeds would give it)
SAME = 0.03  # costs this close (relative) are one cost, whatever the measured noise says ...
NOISE_SIGMAS = 2.0  # ... and so are costs within this many standard errors of each other
PROBE_ERROR = 0.25  # relative error of the one-sample probe as a stand-in for a step's fixed compute
STALE = 10.0  # relative error of a per-sample cost carried over from an earlier operating point


def smooth(previous: Optional[float], measured: float) -> float:
    return measured if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * measured


@dataclass(frozen=True)
class StepCost:
    """Processor seconds of one step of ``n`` samples: ``fixed + n × per_sample``."""

    fixed: float
    per_sample: float
    # relative standard errors of the two (0: exact, as in made-up costs), from the window's spread
    fixed_err: float = 0.0
    per_sample_err: float = 0.0

    @classmethod
    def measured(
        cls,
        samples: float,
        busy: float,
        compute: float,
        compute_fixed: float,
        previous: Optional["StepCost"] = None,
        busy_err: float = 0.0,
        compute_err: float = 0.0,
    ) -> "StepCost":
        """From one operating point: a step of ``samples`` took ``busy`` seconds, ``compute`` of them in
        the compute window (forward/backward), of which ``compute_fixed`` does not grow with the share
        (a one-sample pass: per-operation dispatch). The rest of the step is fixed too.

        When the share-dependent part is under ``RELIABLE`` of the window (a share of a few samples),
        it is mostly measurement noise, and dividing it by a few samples would make the worker look
        many times slower per sample than it is — and keep it starved (seen: a worker briefly slowed
        ended at 1 sample of 510 with 72 µs a sample against a real 10). The per-sample cost of
        ``previous`` (a larger operating point) is kept then, marked ``STALE``: it describes another
        operating point, and the planner must not keep a worker starved on its account (``pooled``).

        The errors: ``busy_err`` and ``compute_err`` are the standard errors of the window's medians
        (worker/meter.py); the probe misses a step's own dispatch cost by up to ``PROBE_ERROR`` of
        itself, and that error lands whole on the share-dependent part. So a share-dependent part
        that is small next to the fixed one (a small model, a small share) is an uncertain one: on
        two identical workers at 128 samples each of the small benchmark model, 0.2 ms of 0.45 ms,
        the per-sample costs read 1.3 and 2.2 µs."""
        cf = min(max(compute_fixed, 0.0), compute)
        fixed = max(busy - compute, 0.0) + cf
        fixed_err = (busy_err + compute_err + PROBE_ERROR * cf) / max(fixed, 1e-12)
        if previous is not None and compute - cf <= RELIABLE * compute:  # <=: an empty window too
            return cls(fixed, previous.per_sample, fixed_err, STALE)
        cf = min(cf, (1 - RELIABLE) * compute)
        part = max(compute - cf, 1e-12)
        err = min((compute_err + PROBE_ERROR * cf) / part, STALE)
        return cls(fixed, part / max(samples, 1.0), fixed_err, err)


def normalise(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


def target_shares(
    costs: Sequence[StepCost],
    capacities: Sequence[float],
    batch: int,
    minimum: Optional[Sequence[float]] = None,
) -> list[float]:
    """Shares of a ``batch`` that make every worker finish its step at the same time.

    Worker i's step of n_i samples takes ``(fixed_i + n_i·per_sample_i) / capacity_i``. Equal times T
    with sum(n_i) = batch give ``T = (batch + Σ fixed/per_sample) / Σ capacity/per_sample`` and
    ``n_i = (capacity_i·T − fixed_i) / per_sample_i``. A worker whose solution is under its ``minimum``
    (samples; at least one: nobody is starved) keeps the minimum and the others are solved again. With
    no fixed costs this is plain proportionality to speed × capacity. Why the fixed part matters: two
    workers sharing a core both pay it on that core, so shares proportional to speed alone leave that
    core the slowest."""
    speeds = [1.0 / c.per_sample for c in costs]
    fixed = [c.fixed for c in costs]
    k = len(speeds)
    lo = [max(1.0, m) for m in minimum] if minimum is not None else [1.0] * k
    if sum(lo) >= batch:
        return normalise(lo)
    floor = [False] * k
    while True:
        free = [i for i in range(k) if not floor[i]]
        rest = batch - sum(lo[i] for i in range(k) if floor[i])
        t = (rest + sum(speeds[i] * fixed[i] for i in free)) / sum(speeds[i] * capacities[i] for i in free)
        n = [lo[i] if floor[i] else speeds[i] * (capacities[i] * t - fixed[i]) for i in range(k)]
        low = [i for i in free if n[i] < lo[i]]
        if not low or len(low) == len(free):
            return normalise([max(x, lo[i]) for i, x in enumerate(n)])
        for i in low:
            floor[i] = True


def floor_limits(capacities: Sequence[float], batch: int) -> list[float]:
    """The fewest samples a worker gets in any balanced plan: ``FLOOR`` of its capacity share.

    Why a floor: a per-sample cost is measured at the worker's own share, and the share-dependent
    part of a small share is small next to the errors of the measurement (the probe's, the window's
    noise), so a worker pushed down reads slower per sample than it is, and is pushed further (seen:
    identical workers at 2.6% / 97.4% and 0.4%, the starved one reading 37–45 µs a sample against
    0.8–0.9 µs; a worker slowed for a moment kept one sample of 256 for 6,564 steps). At a quarter
    of its capacity share the share-dependent part is a quarter of what equal shares would give, which
    the error estimates can still judge. The cost: a worker more than 4× slower than its peers keeps a
    quarter of an equal share, more than the balanced plan would give it, but less than equal shares
    do — a floored plan still never loses to equal shares."""
    caps = normalise(capacities)
    return [FLOOR * c * batch for c in caps]


def pooled(values: Sequence[float], errors: Sequence[float]) -> list[float]:
    """``values`` (one per worker) where those that cannot be told apart are replaced by one value.

    Two values cannot be told apart when they differ by at most ``SAME`` of the larger plus
    ``NOISE_SIGMAS`` standard errors of the difference (``errors``: relative standard errors). From
    the most certain value on, each joins the nearest group whose centre (the members' mean weighted
    by their certainty, with the error of its most certain member) it cannot be told apart from, or
    starts one; every member of a group gets its centre. (Nearest, not first: on the heterogeneous
    benchmark an uncertain worker of the shared core joined the worker alone on core 0, 7.4 against
    9.6 µs, and held its plan at 0.62 instead of ~0.7.) So identical workers whose costs differ by
    measurement noise get one cost, and equal shares (the issue's 2.6% / 97.4% came from 1.6 against
    1.4 µs a sample on identical workers, well within the noise of 0.2 ms of share-dependent compute
    measured next to a 0.25 ms probe); a cost marked ``STALE`` joins the group nearest to it, and is
    measured again at the shares that gives instead of freezing the plan; a real difference (the
    heterogeneous benchmark's 7 against 21 µs of core time a sample) is far outside the noise and kept."""
    err = [max(e, 1e-9) for e in errors]
    groups: list[list[int]] = []

    def centre(g: list[int]) -> float:
        w = [1.0 / err[i] ** 2 for i in g]
        return sum(wi * values[i] for wi, i in zip(w, g)) / sum(w)

    def distance(i: int, g: list[int]) -> float:  # in tolerances: 1 or less cannot be told apart
        c, a = centre(g), values[i]
        sigma = math.hypot(err[i] * a, err[g[0]] * c)
        return abs(a - c) / max(SAME * max(abs(a), abs(c)) + NOISE_SIGMAS * sigma, 1e-300)

    for i in sorted(range(len(values)), key=lambda j: err[j]):
        near = min(groups, key=lambda g: distance(i, g), default=None)
        if near is not None and distance(i, near) <= 1.0:
            near.append(i)
        else:
            groups.append([i])
    out = list(values)
    for g in groups:
        c = centre(g)
        for i in g:
            out[i] = c
    return out


def comparable(costs: Sequence[StepCost]) -> list[StepCost]:
    """``costs`` with the differences within measurement noise taken out (``pooled``). Processor
    time, not per core: identical workers pay the same processor seconds whatever core they got, and
    ``target_shares`` turns equal costs into shares by capacity (what a generation starts from)."""
    fixed = pooled([c.fixed for c in costs], [c.fixed_err for c in costs])
    per = pooled([c.per_sample for c in costs], [c.per_sample_err for c in costs])
    return [StepCost(f, p, c.fixed_err, c.per_sample_err) for f, p, c in zip(fixed, per, costs)]


def shrink_limits(current: Sequence[float], batch: int) -> list[float]:
    """The fewest samples each worker may get in the next plan: ``SHRINK`` of its current share. One
    noisy measurement window must not starve a worker in one plan (seen: 9% → 1.6% of the batch after
    one window that paid for something else); a worker that really slowed down halves its share at
    each re-plan, which is a few windows."""
    now = normalise(current)
    return [SHRINK * s * batch for s in now]


def step_time(
    shares: Sequence[float], costs: Sequence[StepCost], capacities: Sequence[float], batch: int
) -> float:
    """Predicted wall time of a lockstep step at ``shares``: its slowest worker's."""
    return max(
        (c.fixed + s * batch * c.per_sample) / cap for s, c, cap in zip(normalise(shares), costs, capacities)
    )


def propose(
    current: Sequence[float],
    target: Sequence[float],
    costs: Sequence[StepCost],
    capacities: Sequence[float],
    batch: int,
    hysteresis: float = HYSTERESIS,
) -> Optional[list[float]]:
    """``target`` shares (normalised), or None when they are not worth a plan: the measured costs
    predict a step at most ``hysteresis`` faster with them than with ``current``, or no share moves by
    more than ``MOVE`` (so that measurement noise does not make shares oscillate).

    Why both: the predicted current step is the slowest of K noisy predictions, so with noise alone it
    exceeds the balanced one by more with every worker (simulated, 5% noise per window: 8 workers
    re-planned at 94% of considerations); the size of the move alone, as an absolute 3% of the batch,
    never moved one of 16 or more workers (a half-speed worker among 20 goes from 0.05 to 0.026 of the
    batch, and kept every step ~1.5× longer)."""
    now, new = normalise(current), normalise(target)
    absolute, relative = MOVE
    if not any(abs(t - c) > absolute or abs(t - c) > relative * c for t, c in zip(new, now)):
        return None
    if step_time(now, costs, capacities, batch) <= (1 + hysteresis) * step_time(
        new, costs, capacities, batch
    ):
        return None
    return [round(t, 4) for t in new]


def ideal_gain(speeds: Sequence[float]) -> float:
    """Speed-up of proportional over equal shares in a lockstep step: sum(speed) / (K · min(speed));
    NaN while a worker has no measured speed."""
    return sum(speeds) / (len(speeds) * min(speeds)) if min(speeds) > 0 else float("nan")


def capacities(placements: Sequence[tuple[str, Sequence[int], int, bool]]) -> list[float]:
    """Cores each worker can count on, from ``(host, cpu_list, threads, has_gpu)`` per worker: a core
    that n workers of the same host are pinned to gives each 1/n of itself; a worker uses at most
    ``threads`` cores; a GPU worker counts as one device."""
    users = Counter((host, c) for host, cpus, _, _ in placements for c in cpus)
    return [
        1.0 if gpu else (min(threads, sum(1 / users[(host, c)] for c in cpus)) if cpus else float(threads))
        for host, cpus, threads, gpu in placements
    ]
