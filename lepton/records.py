"""The records of ``metrics.jsonl``: one type per kind a worker sends.

``metrics.jsonl`` is a public format: each record's ``to_dict()`` is exactly the line written
(keys in the order shown, values as given; JSON turns a non-finite loss into null). Writers build
a record and send ``to_dict()``; readers call ``parse_record`` on a line's dict and dispatch on the
type instead of on ``rec["kind"]`` strings.

Kinds, all written by rank 0 of a generation:
- ``train``: the mean loss, learning rate and throughput of the steps since the last one;
- ``eval``: one evaluation of a split (``val`` periodically and at the end, ``test`` at the end);
  its metric names depend on the task, so they are kept as a dict and flattened into the line;
- ``best``: keep-best kept the model of this step (its validation ``metric`` reached ``value``);
- ``decision``: an evaluation policy decided (``early_stop`` or ``lr``) at this step;
- ``plan``: plan ``version`` of the shares took effect from the step after ``step``;
- ``skipped_step``: step ``step`` had a non-finite loss or gradient: no rank updated;
- ``generation_first_step``: the first step of a generation completed (recovery timing).

This module sits at the bottom layer: it imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from time import time as _now
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class MetricRecord:
    """A line of ``metrics.jsonl``. Fields are declared in the order the line writes them."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, line: dict[str, Any]):
        missing = [f.name for f in fields(cls) if f.name not in line]
        if missing:
            raise TypeError(f"{cls.kind} record without {', '.join(missing)}")
        return cls(**{f.name: line[f.name] for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class TrainRecord(MetricRecord):
    kind: ClassVar[str] = "train"
    time: float = field(default_factory=_now)
    step: int
    epoch: int
    total_steps: int
    loss: float | None  # mean over the samples since the last train record
    lr: float
    samples_per_s: float | None  # None when no time was measured
    generation: int
    workers: int


@dataclass(frozen=True, kw_only=True)
class EvalRecord(MetricRecord):
    """``metrics`` (``count``, ``loss``, ``accuracy``, ... per task) is flattened into the line."""

    kind: ClassVar[str] = "eval"
    split: str  # train | val | test
    time: float = field(default_factory=_now)
    step: int
    epoch: int
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "split": self.split,
            "time": self.time,
            "step": self.step,
            "epoch": self.epoch,
            **self.metrics,
        }

    @classmethod
    def from_dict(cls, line: dict[str, Any]) -> EvalRecord:
        named = ("kind", "split", "time", "step", "epoch")
        missing = [key for key in named[1:] if key not in line]
        if missing:
            raise TypeError(f"eval record without {', '.join(missing)}")
        return cls(
            split=line["split"],
            time=line["time"],
            step=line["step"],
            epoch=line["epoch"],
            metrics={key: value for key, value in line.items() if key not in named},
        )


@dataclass(frozen=True, kw_only=True)
class BestRecord(MetricRecord):
    kind: ClassVar[str] = "best"
    time: float = field(default_factory=_now)
    step: int
    value: float
    metric: str  # e.g. val.loss


@dataclass(frozen=True, kw_only=True)
class DecisionRecord(MetricRecord):
    kind: ClassVar[str] = "decision"
    decision: str  # early_stop | lr
    time: float = field(default_factory=_now)
    step: int
    reason: str
    details: dict[str, Any]
    lr: float  # the learning rate from this step on


@dataclass(frozen=True, kw_only=True)
class PlanRecord(MetricRecord):
    kind: ClassVar[str] = "plan"
    time: float = field(default_factory=_now)
    step: int
    version: int
    shares: list[float]  # rounded to 6 decimals


@dataclass(frozen=True, kw_only=True)
class SkippedStepRecord(MetricRecord):
    kind: ClassVar[str] = "skipped_step"
    time: float = field(default_factory=_now)
    step: int
    lr_scale: float  # the divergence guard's scale after the skip
    reason: str = "non-finite loss or gradient"


@dataclass(frozen=True, kw_only=True)
class GenerationFirstStepRecord(MetricRecord):
    kind: ClassVar[str] = "generation_first_step"
    generation: int
    step: int
    time: float = field(default_factory=_now)
    transport: str  # shm | gloo | nccl


RECORD_TYPES: dict[str, type[MetricRecord]] = {
    cls.kind: cls
    for cls in (
        TrainRecord,
        EvalRecord,
        BestRecord,
        DecisionRecord,
        PlanRecord,
        SkippedStepRecord,
        GenerationFirstStepRecord,
    )
}


class UnknownRecord(ValueError):
    """A line whose kind no record type has (a newer writer, or not a metrics line)."""


def parse_record(line: dict[str, Any]) -> MetricRecord:
    """The typed record of a ``metrics.jsonl`` line. Raises ``UnknownRecord`` for a kind this
    version does not know, ``TypeError`` for a line that lacks one of its kind's fields.
    ``parse_record(line).to_dict() == line`` for every line a worker wrote."""
    cls = RECORD_TYPES.get(line.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise UnknownRecord(f"metrics record of unknown kind {line.get('kind')!r}")
    return cls.from_dict(line)
