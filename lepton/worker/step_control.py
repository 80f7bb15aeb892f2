"""The control values that ride in the gradient allreduce: one step's votes and counts, no extra collective.

The flat gradient buffer (``comm.FlatGradients``) ends in ``slots(world)`` extra entries, zeroed
with the gradients before every step. Each rank writes its own values there (``StepControl.pack``)
before the step's one allreduce, a SUM over the ranks, and reads the reduced values after it
(``ReducedControl.unpack``). Every rank reads the same reduced bits, so every rank takes the same
decision at the same step (invariant 5).

| slot            | a rank writes                                  | the sum means                          |
|-----------------|------------------------------------------------|----------------------------------------|
| 0 LOSS_SUM      | its samples' summed loss (0 if it had none)    | the global batch's summed loss         |
| 1 SAMPLES       | how many samples it computed                   | the global sample count: checked equal |
|                 |                                                | to the plan's batch at this step       |
| 2 REGROUP_VOTES | 1 if it wants the generation to end            | > 0: every rank ends the generation    |
|                 |                                                | after this step (its update applied)   |
| 3 PLAN_VOTES    | 1 if it knows the next share plan              | how many ranks added the shares below  |
| 4 .. 4+world-1  | the next plan's shares, if it knows them       | shares × PLAN_VOTES: their mean is the |
|   NEXT_SHARES   |                                                | plan every rank applies from the next  |
|                 |                                                | step on                                |

Everything is summed (the gradients' reduction); a vote is "some rank said yes" as a sum > 0. The
ranks that know the next plan all add the same shares, so the mean of the reduced shares is that
plan, computed from the same bits everywhere. A world-size change is a new generation, whose
buffer has ``slots(world)`` extra entries on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class Slot(IntEnum):
    LOSS_SUM = 0
    SAMPLES = 1
    REGROUP_VOTES = 2
    PLAN_VOTES = 3
    NEXT_SHARES = 4  # the first of ``world`` slots, one per rank


FIXED_SLOTS = len(Slot) - 1  # the slots before the shares


def slots(world: int) -> int:
    """Extra entries the gradient buffer needs for a generation of ``world`` ranks."""
    return FIXED_SLOTS + world


@dataclass
class StepControl:
    """What this rank contributes to a step's reduction."""

    loss_sum: float = 0.0
    samples: int = 0
    regroup: bool = False  # this rank's vote to end the generation after the step
    next_plan: list[float] | None = None  # the next share plan, if this rank has received it

    def pack(self, extra: torch.Tensor, world: int) -> None:
        """Write into the buffer's extra entries (zeroed with the gradients). Slot by slot: on a GPU
        a scalar write is an asynchronous fill, where one tensor write would be a host copy."""
        extra[Slot.LOSS_SUM] = self.loss_sum
        extra[Slot.SAMPLES] = self.samples
        extra[Slot.REGROUP_VOTES] = float(self.regroup)
        if self.next_plan is not None:
            extra[Slot.PLAN_VOTES] = 1.0
            extra[Slot.NEXT_SHARES : Slot.NEXT_SHARES + world] = torch.tensor(
                self.next_plan, dtype=extra.dtype
            )


@dataclass
class ReducedControl:
    """The step's reduced control values: the same on every rank."""

    loss_sum: float
    samples: int
    regroup: bool  # some rank voted: the generation ends after this step
    next_shares: list[float] | None  # some rank knew the next plan: applied from the next step

    @classmethod
    def unpack(cls, extra: torch.Tensor, world: int) -> ReducedControl:
        """One read of the reduced extra entries (one device sync on a GPU)."""
        loss_sum, samples, regroup_votes, plan_votes, *plan_sum = extra[: slots(world)].tolist()
        next_shares = [share / plan_votes for share in plan_sum] if plan_votes > 0 else None
        return cls(loss_sum, int(samples), regroup_votes > 0, next_shares)
