"""Deterministic fault injection, a product feature for tests and chaos benchmarks (design §7).

``LEPTON_FAULTS`` holds ``;``-separated rules ``ACTION:key=value:...`` applied by a worker at step
boundaries (before running global step ``step``):
- ``crash:rank=R:step=S``      exit at once with code 17 (like a crash; no cleanup, no report)
- ``kill:rank=R:step=S``       SIGKILL itself
- ``slow:rank=R:seconds=X``    sleep X seconds before every step (a slow worker); ``rank=*`` for all
``rank`` is the rank in the current generation. A rule without ``step`` applies to every step.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass
class Fault:
    action: str
    rank: str = "*"
    step: int | None = None
    seconds: float = 0.0

    def applies(self, rank: int, step: int) -> bool:
        return (self.rank == "*" or int(self.rank) == rank) and (self.step is None or self.step == step)


def parse(text: str) -> list[Fault]:
    faults = []
    for rule in filter(None, (r.strip() for r in text.split(";"))):
        action, *pairs = rule.split(":")
        if action not in ("crash", "kill", "slow"):
            raise ValueError(f"LEPTON_FAULTS: unknown action {action!r} in {rule!r}")
        kw = dict(p.split("=", 1) for p in pairs)
        faults.append(Fault(action, kw.get("rank", "*"), int(kw["step"]) if "step" in kw else None,
                            float(kw.get("seconds", 0))))
    return faults


class FaultInjector:
    def __init__(self, text: str | None = None):
        self.faults = parse(text if text is not None else os.environ.get("LEPTON_FAULTS", ""))

    def before_step(self, rank: int, step: int) -> None:
        for f in self.faults:
            if not f.applies(rank, step):
                continue
            if f.action == "slow":
                time.sleep(f.seconds)
            elif f.action == "crash":
                os._exit(17)
            elif f.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
