"""What a worker measures of its own steps for the balancer (heartbeat fields).

The coordinator models a worker's step as ``fixed + samples × per_sample`` seconds of processor time
(``balance.StepCost``), so a worker reports, over its last ``window`` steps at the current share plan,
the samples it computed per step, the processor time of the *whole* step (from the start of one to
the start of the next: compute window, reduction work, update and the training loop's own
bookkeeping), the part of it in the compute window, and what a one-sample forward/backward costs (the
compute window's own fixed part: per-operation dispatch; ``Trainer.probe_fixed_cost``, measured in
the step that switches to a plan, which is left out of the window anyway). Without that last part a
small share looks far more expensive per sample than it is (0.4 ms of dispatch over 10 samples is 40
µs a sample against a marginal 5–10), and a worker slowed for a moment got starved for good. Measured
on the heterogeneous benchmark (pinning 0,1,1): the part outside the compute window was ~0.5 ms per
step for the worker alone on its core and ~0.6 ms for each of the two sharing a core, the one-sample
pass ~0.2–0.35 ms, next to 0.75–1.8 ms of compute; the update and reduction work alone (all the
balancer counted as fixed before) was ~0.4 ms.

With each median goes its standard error, from the window's spread (``median_error``): a step dominated
by fixed costs spreads by as much as its share-dependent part, and the balancer must not read that as a
speed difference (``balance.pooled``).

Processor time, not wall time: two workers pinned to one core that take turns would each see
full-speed wall times while together they get one core; the coordinator divides by the worker's
capacity. On a GPU the kernels' time is wall time, so there a step's busy time is its compute window
plus its update, both wall-clock. Waiting for peers costs (almost) no processor time: the shared-memory
and gloo waits sleep.
"""

from __future__ import annotations

import time
from collections import deque
from statistics import median
from typing import Optional

WINDOW = 10  # steps over which a worker measures itself
FIRST_WINDOW = 4  # ... at a generation's starting shares, which are a guess (capacities) or an old plan
# the heartbeat fields of a worker without a full window at its current plan
NOT_MEASURED = {
    "step_samples": 0.0,
    "step_busy_s": 0.0,
    "step_compute_s": 0.0,
    "step_compute_fixed_s": 0.0,
    "step_busy_err_s": 0.0,
    "step_compute_err_s": 0.0,
}


def median_error(values: list[float]) -> float:
    """Standard error of the median of ``values``, from their spread: 1.2533 σ/√n for normal noise,
    σ estimated robustly as 1.4826 × the median absolute deviation (one outlier step, which the
    median leaves out, does not widen it)."""
    if len(values) < 2:
        return 0.0
    mid = median(values)
    mad = median(abs(v - mid) for v in values)
    return 1.2533 * 1.4826 * mad / len(values) ** 0.5


class StepMeter:
    """Call ``begin()`` at the top of every loop iteration and ``record(result)`` after its step; an
    iteration that did other work (the first step of a generation, an evaluation, a checkpoint copy, a
    plan switch) is ``discard()``-ed. A record is closed by the next ``begin()``, which is when the
    step's processor time is known."""

    def __init__(self, on_gpu: bool, window: int = WINDOW, first_window: Optional[int] = None):
        """``first_window``: a shorter window at the starting shares. They are usually far from the
        balanced ones (capacity-based shares ignore that two workers on one core pay their fixed costs
        twice: on the heterogeneous benchmark its steps take ~40% longer than balanced ones), so the
        first plan is worth more early than precise; the plans after it measure full windows."""
        self.on_gpu, self.window = on_gpu, window
        self.compute_fixed = 0.0  # Trainer.probe_fixed_cost at the current plan: the fixed part of compute
        # samples, compute window (wall s), compute window (busy s), whole step (busy s)
        self.steps: deque[tuple[int, float, float, float]] = deque(maxlen=first_window or window)
        self._open: Optional[tuple[int, float, float, float]] = None
        self._top = 0.0

    def begin(self) -> None:
        now = time.process_time()
        if self._open is not None:
            n, wall, compute, busy = self._open
            self.steps.append((n, wall, compute, busy if self.on_gpu else now - self._top))
            self._open = None
        self._top = now

    def record(self, local: int, compute_s: float, compute_cpu_s: float, overhead_s: float) -> None:
        """A step's samples, its compute window (wall and processor seconds) and its update and
        reduction work (processor seconds; wall on a GPU)."""
        compute = compute_s if self.on_gpu else compute_cpu_s
        self._open = (local, compute_s, compute, compute + overhead_s)

    def discard(self) -> None:
        self._open = None

    def reset(self) -> None:
        """A new share plan: measurements at the old shares describe another operating point."""
        self.steps = deque(maxlen=self.window)
        self._open = None

    @property
    def full(self) -> bool:
        return len(self.steps) == self.steps.maxlen

    def fields(self) -> dict:
        """Heartbeat fields: ``samples_per_s`` (compute throughput, wall clock, shown to users) always;
        the per-step medians the balancer uses (``step_samples``, ``step_busy_s``, ``step_compute_s``)
        only over a full window, else 0."""
        # the step_* fields are always there: the heartbeat's fields are merged, so a missing one would
        # send the last plan's medians labelled with the new plan (the coordinator took them for a
        # measurement of it)
        if not self.steps:
            return dict(NOT_MEASURED)
        n, wall, compute, busy = map(sum, zip(*self.steps))
        out = {"samples_per_s": n / wall if wall > 0 else 0.0}
        if not (self.full and busy > 0):
            return {**out, **NOT_MEASURED}
        # medians, not means: one step of a window that paid for something else (a garbage collection,
        # a page fault storm) made a 36-sample share look 31 µs a sample instead of ~10 and sent the
        # next plan to 1.6% of the batch (seen on the heterogeneous benchmark)
        # with the medians, their standard errors: how far the balancer may trust them (a window of a
        # step dominated by fixed costs spreads as much as its share-dependent part; balance.pooled)
        busy_s, compute_s = [x[3] for x in self.steps], [x[2] for x in self.steps]
        return {
            **out,
            "step_samples": median(x[0] for x in self.steps),
            "step_busy_s": median(busy_s),
            "step_compute_s": median(compute_s),
            "step_compute_fixed_s": self.compute_fixed,
            "step_busy_err_s": median_error(busy_s),
            "step_compute_err_s": median_error(compute_s),
        }
