"""Heterogeneity-aware shares: each worker's part of the global batch follows its measured speed.

A worker's effective speed is its *core speed* (samples per second of processor time, which it
measures and reports in heartbeats; wall time on a GPU) times its *capacity* (how many cores it can
count on, from the placement it registered with). Processor time, not wall time: two workers pinned to
one core that take turns would each see full-speed wall times, yet together they only get one core. The policy is a pair of pure functions so the coordinator can
call them at its decision points and tests can drive them with made-up numbers. Shares never change
the math (invariant 1): any split of a global batch gives the same update.
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


def propose(current: Sequence[float], speeds: Sequence[float], hysteresis: float = HYSTERESIS) -> Optional[list[float]]:
    """New shares proportional to ``speeds``, or None when they are within ``hysteresis`` of
    ``current`` (so that measurement noise does not make shares oscillate)."""
    target = normalise(speeds)
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
