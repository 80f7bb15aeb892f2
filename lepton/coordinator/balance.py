"""Heterogeneity-aware shares: each worker's part of the global batch follows its measured speed.

A worker's effective speed is its *core speed* (samples per second of processor time, which it
measures and reports in heartbeats; wall time on a GPU) times its *capacity* (how many cores it can
count on, from the placement it registered with). Processor time, not wall time: two workers pinned to
one core that take turns would each see full-speed wall times, yet together they only get one core.
Each worker also reports its per-step *overhead* (processor time of the update and of its part of the
reduction, paid whatever its share), and shares are chosen so that every worker's step ends at the same
time (``target_shares``). The policy is pure functions so the coordinator can call them at its
decision points and tests can drive them with made-up numbers. Shares never change the math
(invariant 1): any split of a global batch gives the same update.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

SMOOTHING = 0.5        # weight of a new speed report in the coordinator's moving average
HYSTERESIS = 0.03      # re-plan only when some worker's share of the batch would move by more than 3%


def smooth(previous: Optional[float], measured: float) -> float:
    return measured if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * measured


def normalise(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


def target_shares(speeds: Sequence[float], capacities: Sequence[float], overheads: Sequence[float],
                  batch: int) -> list[float]:
    """Shares of a ``batch`` that make every worker finish its step at the same time.

    Worker i needs ``overheads[i]`` seconds of processor time per step whatever its share (the
    optimizer update and its part of the reduction: every replica pays them) plus ``n_i / speeds[i]``
    for its n_i samples, and gets ``capacities[i]`` of a core, so its step takes
    ``(overheads[i] + n_i / speeds[i]) / capacities[i]``. Equal times T with sum(n_i) = batch give
    ``T = (batch + Σ speed·overhead) / Σ speed·capacity`` and ``n_i = speed_i·(capacity_i·T − overhead_i)``.
    A worker whose overhead alone exceeds T keeps one sample and the others are solved again. With no
    overheads this is plain proportionality to speed × capacity. Why the overhead matters: two workers
    sharing a core both pay it on that core, so shares proportional to speed alone leave that core the
    slowest (measured: 0.62/0.20/0.18 for pinning 0,1,1 → 3.37 ms steps; with overheads 0.69/0.16/0.15
    → 3.02 ms)."""
    k = len(speeds)
    floor = [False] * k
    while True:
        free = [i for i in range(k) if not floor[i]]
        rest = batch - (k - len(free))
        t = (rest + sum(speeds[i] * overheads[i] for i in free)) / sum(speeds[i] * capacities[i] for i in free)
        n = [1.0 if floor[i] else speeds[i] * (capacities[i] * t - overheads[i]) for i in range(k)]
        low = [i for i in free if n[i] < 1.0]
        if not low or len(low) == len(free):
            return normalise([max(x, 1.0) for x in n])
        for i in low:
            floor[i] = True


def propose(current: Sequence[float], target: Sequence[float], hysteresis: float = HYSTERESIS) -> Optional[list[float]]:
    """``target`` shares (normalised), or None when they are within ``hysteresis`` of ``current`` (so
    that measurement noise does not make shares oscillate)."""
    target = normalise(target)
    now = normalise(current)
    if max(abs(t - c) for t, c in zip(target, now)) <= hysteresis:
        return None
    return [round(t, 4) for t in target]


def ideal_gain(speeds: Sequence[float]) -> float:
    """Speed-up of proportional over equal shares in a lockstep step: sum(speed) / (K · min(speed))."""
    return sum(speeds) / (len(speeds) * min(speeds))


def capacities(placements: Sequence[tuple[str, Sequence[int], int, bool]]) -> list[float]:
    """Cores each worker can count on, from ``(host, cpu_list, threads, has_gpu)`` per worker: a core
    that n workers of the same host are pinned to gives each 1/n of itself; a worker uses at most
    ``threads`` cores; a GPU worker counts as one device."""
    users = Counter((host, c) for host, cpus, _, _ in placements for c in cpus)
    return [1.0 if gpu else (min(threads, sum(1 / users[(host, c)] for c in cpus)) if cpus else float(threads))
            for host, cpus, threads, gpu in placements]
