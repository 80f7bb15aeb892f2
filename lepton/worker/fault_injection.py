"""Deterministic fault injection, a product feature for tests and chaos benchmarks.

``LEPTON_FAULTS`` holds ``;``-separated rules ``ACTION:key=value:...`` that a worker applies at
well-defined points:
- actions: ``crash`` (exit at once with code 17, no cleanup), ``kill`` (SIGKILL itself),
  ``hang`` (SIGSTOP itself), ``slow`` (sleep ``seconds`` before the step), ``throttle`` (spin the
  CPU ``seconds`` per sample this rank computes, inside its compute time: a slower processor),
  ``nan`` (this rank's loss at ``step`` becomes NaN: a numerical blow-up);
- ``at``: ``step`` (default; before running global step ``step``), ``eval`` (as a validation at
  ``step`` starts), ``checkpoint`` (right after rank 0 started writing the checkpoint of ``step``),
  ``start`` (before registering: a worker that fails at start-up), ``registered`` (right after
  registering, before the model and data load: a worker lost while it joins), ``broadcast`` (as a
  generation's state broadcast starts, with ``step`` the step it starts from);
- ``rank``: the rank in the current generation (``*``, the default, for all; at ``start`` and
  ``registered``, before any generation, K of ``lepton train``'s worker-K, so a restart is not
  hit); ``step``: omit to apply at every step; ``until``: ``throttle`` only, before global step
  ``until`` only (a transient slow-down); ``crash``/``kill``/``hang`` fire only in generation 0
  (so the survivors that redo the step are not hit again) unless ``always=1``.
Example: ``kill:rank=1:step=5;slow:rank=2:seconds=0.01``.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

ACTIONS = ("crash", "kill", "hang", "slow", "throttle", "nan")
POINTS = ("step", "eval", "checkpoint", "start", "registered", "broadcast")


@dataclass
class Fault:
    action: str
    at: str = "step"
    rank: str = "*"
    step: int | None = None
    seconds: float = 0.0
    always: bool = False
    until: int | None = None  # throttle: only before this global step

    def applies(self, at: str, rank: int | None, step: int | None, generation: int | None) -> bool:
        first_only = self.action in ("crash", "kill", "hang") and not self.always
        return (
            self.at == at
            and (self.rank == "*" or (rank is not None and int(self.rank) == rank))
            and (self.step is None or self.step == step)
            and not (first_only and generation)
        )


def parse(text: str) -> list[Fault]:
    faults = []
    for rule in filter(None, (r.strip() for r in text.split(";"))):
        action, *pairs = rule.split(":")
        kw = dict(p.split("=", 1) for p in pairs)
        if action not in ACTIONS or kw.get("at", "step") not in POINTS:
            raise ValueError(f"LEPTON_FAULTS: cannot parse {rule!r} (actions {ACTIONS}, at {POINTS})")
        faults.append(
            Fault(
                action,
                kw.get("at", "step"),
                kw.get("rank", "*"),
                int(kw["step"]) if "step" in kw else None,
                float(kw.get("seconds", 0)),
                kw.get("always") == "1",
                int(kw["until"]) if "until" in kw else None,
            )
        )
    return faults


class FaultInjector:
    def __init__(self, text: str | None = None):
        self.faults = parse(text if text is not None else os.environ.get("LEPTON_FAULTS", ""))

    def throttle(self, rank: int, samples: int, step: int | None = None) -> None:
        """The ``throttle`` rules: called by the trainer inside its compute window of global ``step``."""
        for f in self.faults:
            if f.action != "throttle" or (f.until is not None and step is not None and step >= f.until):
                continue
            if f.rank == "*" or int(f.rank) == rank:
                # busy, not asleep: a slower processor burns processor time, which speed measures
                end = time.process_time() + f.seconds * samples
                while time.process_time() < end:
                    pass

    def poisoned(self, rank: int, step: int) -> bool:
        return any(
            f.action == "nan" and (f.rank == "*" or int(f.rank) == rank) and f.step in (None, step)
            for f in self.faults
        )

    def has(self, action: str) -> bool:
        return any(f.action == action for f in self.faults)

    def fire(
        self, at: str, rank: int | None = None, step: int | None = None, generation: int | None = None
    ) -> None:
        for f in self.faults:
            if not f.applies(at, rank, step, generation):
                continue
            if f.action in ("throttle", "nan"):
                continue
            if f.action == "slow":
                time.sleep(f.seconds)
            elif f.action == "crash":
                os._exit(17)
            elif f.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.action == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
