"""Evaluation-driven policies: small objects that turn validation metrics into decisions.

Where they run, and why: a validation's metrics are reduced exactly, so every worker holds the same
numbers at the same step. Each worker therefore feeds them to its own copy of the job's policies
(``observe(step, metrics)``) and every copy returns the same decision at that very step: a
learning-rate factor, or "finish now". The decision takes effect on every worker at the same step
(invariant 5) without a round trip, and the step it takes effect at does not depend on timing, so a
job still ends with the same model for any number of workers and after any failure. Rank 0 reports
each decision; the coordinator records it as an event with its reason and numbers. The policies'
state travels with the replica's state (checkpoints, the broadcast to a new generation).
Policies are pure state machines: tests drive them with made-up metric sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .spec import EarlyStoppingSpec, PlateauSpec, PoliciesSpec


@dataclass
class Decision:
    kind: str  # "lr" | "finish"
    reason: str
    lr_factor: Optional[float] = None
    details: dict = field(default_factory=dict)


def metric_value(metrics: dict, name: str) -> Optional[float]:
    """``val.loss`` → metrics["loss"] of a validation record (the split prefix is the record's)."""
    return metrics.get(name.split(".", 1)[1] if "." in name else name)


class Tracker:
    """Best value so far of one metric, and evaluations since it last improved by more than min_delta."""

    def __init__(self, mode: str, min_delta: float):
        self.mode, self.min_delta = mode, min_delta
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.stale = 0

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale}

    def load(self, st: dict) -> None:
        self.best, self.best_step, self.stale = st["best"], st["best_step"], st["stale"]

    def update(self, step: int, value: float) -> bool:
        # a non-finite value is never the best (it compares false with everything: taken as the first
        # best, nothing would ever beat it)
        better = math.isfinite(value) and (
            self.best is None
            or (
                value < self.best - self.min_delta
                if self.mode == "min"
                else value > self.best + self.min_delta
            )
        )
        if better:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        return better

    def standing(self) -> str:
        """For a decision's message: how the metric has done (it may never have been finite)."""
        if self.best is None:
            return "has had no finite value"
        return f"has not improved on {self.best:.6g} (step {self.best_step})"


class ReduceLROnPlateau:
    def __init__(self, spec: PlateauSpec, base_lr: float):
        self.spec, self.base_lr = spec, base_lr
        self.track = Tracker(spec.mode, spec.min_delta)
        self.factor = 1.0

    def state(self) -> dict:
        return {**self.track.state(), "factor": self.factor}

    def load(self, st: dict) -> None:
        self.track.load(st)
        self.factor = st["factor"]

    def observe(self, step: int, metrics: dict) -> Optional[Decision]:
        value = metric_value(metrics, self.spec.metric)
        if value is None or self.track.update(step, value) or self.track.stale <= self.spec.patience:
            return None
        new = max(self.factor * self.spec.factor, self.spec.min_lr / self.base_lr)
        self.track.stale = 0
        if new >= self.factor:
            return None  # already at min_lr
        self.factor = new
        return Decision(
            "lr",
            f"{self.spec.metric} {self.track.standing()} for {self.spec.patience + 1}"
            f" evaluations: lr x{self.spec.factor:g}"
            f" -> {self.base_lr * new:.3g}",
            lr_factor=new,
            details={
                "metric": self.spec.metric,
                "value": value,
                "best": self.track.best,
                "lr": self.base_lr * new,
            },
        )


class EarlyStopping:
    def __init__(self, spec: EarlyStoppingSpec):
        self.spec = spec
        self.track = Tracker(spec.mode, spec.min_delta)

    def state(self) -> dict:
        return self.track.state()

    def load(self, st: dict) -> None:
        self.track.load(st)

    def observe(self, step: int, metrics: dict) -> Optional[Decision]:
        value = metric_value(metrics, self.spec.metric)
        if value is None or self.track.update(step, value) or self.track.stale <= self.spec.patience:
            return None
        return Decision(
            "finish",
            f"early stop: {self.spec.metric} {self.track.standing()} for {self.track.stale}"
            f" evaluations"
            f" (patience {self.spec.patience})",
            details={
                "metric": self.spec.metric,
                "value": value,
                "best": self.track.best,
                "best_step": self.track.best_step,
            },
        )


def build(spec: PoliciesSpec, base_lr: float) -> list:
    out: list = []
    if spec.reduce_on_plateau:
        out.append(ReduceLROnPlateau(spec.reduce_on_plateau, base_lr))
    if spec.early_stopping:
        out.append(EarlyStopping(spec.early_stopping))
    return out
