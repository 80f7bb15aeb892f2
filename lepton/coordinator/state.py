"""The controller's states: the run's phase, each member's state, and the transition record.

Ray Train v2's controller gives each state the cause that put it there; so does this module. The
phase lives in a ``ControllerState`` (phase, cause, since); ``Controller._transition`` is its only
writer and turns every change into a ``Transition`` that observers (the run journal) see as an event.
A member's state is a ``MemberState`` with the cause of its last change beside it (``Member.cause``),
written only by ``Controller._set_member_state``.

Phases::

    waiting ──(enough workers)──▶ running ──(loss, join, leave, stop)──▶ regrouping
       ▲                            │  ▲                                   │
       └──(fewer than min_workers)──┼──┴───(every member paused or lost)───┘
                                    ▼
                       completed | failed | stopped
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Phase(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    REGROUPING = "regrouping"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.STOPPED)


class MemberState(str, Enum):
    """A registered worker's state. A ``str`` enum: heartbeats carry the worker's own view as text
    (``Heartbeat.state``) and compare equal to these."""

    JOINING = "joining"  # registered; loading its model and data
    STANDBY = "standby"  # ready, not in a generation
    TRAINING = "training"  # a member of the current generation (started or about to)
    PAUSED = "paused"  # stopped at a step boundary, holding a live replica
    FINISHED = "finished"  # completed the run and reported its summary
    LOST = "lost"  # died, hung, or was told to exit after a failure
    LEFT = "left"  # left gracefully

    @property
    def gone(self) -> bool:
        """It will never take part again (it is told to exit if it calls)."""
        return self in (MemberState.LOST, MemberState.LEFT)

    @property
    def alive(self) -> bool:
        """Ready to be a member of the next generation."""
        return self in (MemberState.STANDBY, MemberState.PAUSED)


# Shown in this order by the dashboard and the console (state.py is their single source).
PHASES = tuple(p.value for p in Phase)
MEMBER_STATES = tuple(s.value for s in MemberState)


@dataclass(frozen=True)
class ControllerState:
    """The phase and why the controller is in it (``cause``: the reason of the transition into it)."""

    phase: Phase
    cause: str
    since: float


@dataclass(frozen=True)
class Transition:
    """One previous → next change of the phase. ``kind`` names it in events.jsonl (``generation`` for
    entering ``running`` with a new generation, ``regroup``, ``waiting``, ``completed`` ...), so the
    event log reads as the run's history and every phase change is in it exactly once."""

    previous: Phase
    current: Phase
    kind: str
    cause: str
    details: dict[str, Any] = field(default_factory=dict)
