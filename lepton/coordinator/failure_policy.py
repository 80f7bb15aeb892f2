"""Where a failure is handled: the failure policy, which turns what went wrong into a decision.

Like Ray Train v2's ``FailurePolicy.make_decision``, it is pure: it is told what happened and what the
run looks like, and returns a ``FailureDecision``; the controller (membership and phase) and the local
supervisor (processes) carry it out. Keeping the rules here, and only here, is what lets the next
stages (a lost worker reported by one member, parameter servers, cluster engines) change a rule
without reasoning about the whole controller.

The rules (invariant 3: the survivors of a loss are at most one step apart, and the most advanced
of them is the source of the next generation's state, so a loss costs no checkpoint reload):

- a member of the running generation lost (exited, silent, a collective failed) → ``REGROUP``;
  anyone else lost (standby, joining, a generation already regrouping) → ``NONE``;
- a worker reporting an error of its own (``worker_error``): the error is the run's only when every
  member of the generation reports one. Each member's error is counted; once every member still
  there has reported one (a diverged model, which every member sees at the same step because the
  loss is reduced; a deterministic bug in user code; bad data every rank reads) → ``FAIL`` with that
  error ("training diverged ..." as it is; otherwise ``worker W failed: E``, and how many members
  reported it). Until then the reporter is a lost worker: → ``REGROUP`` while its generation runs (the
  others go on without it; ``lepton train`` with ``cluster.restart_failed`` may restart it), ``NONE``
  otherwise (a regroup is under way, or it was not in the generation). A one-member generation's
  error therefore fails the run at once, and no single member's report (a buggy or outdated worker)
  ends a run that others are training;
- fewer live workers than needed → ``WAIT``, until ``cluster.wait_for_workers_s`` has passed → ``FAIL``;
- before the first generation (``start_up``): the workers that can still come are all ready → ``START``;
  ``cluster.start_grace_s`` passed with at least ``cluster.min_workers`` ready → ``START`` with those;
  fewer than ``min_workers`` can still come (local workers that died before training) → ``FAIL`` at
  once; ``cluster.start_timeout_s`` passed → ``FAIL``; else ``WAIT``;
- a local worker process exiting non-zero under ``cluster.restart_failed`` → ``RESTART_LOCAL`` while
  restarts remain (``cluster.max_restarts``); every local worker gone → ``FAIL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..spec import ClusterSpec


class Action(str, Enum):
    REGROUP = "regroup"  # end the generation; its survivors pause and the next one forms from them
    START = "start"  # form the first generation with the workers that are ready now
    WAIT = "wait"  # too few workers: training waits (the live state is checkpointed) until more come
    FAIL = "fail"  # end the run failed
    RESTART_LOCAL = "restart_local"  # start a local worker process in place of one that exited
    NONE = "none"  # nothing beyond recording it


@dataclass(frozen=True)
class FailureDecision:
    action: Action
    reason: str


class FailurePolicy:
    def __init__(self, cluster: ClusterSpec):
        self.cluster = cluster

    def member_lost(self, worker_id: str, how: str, in_running_generation: bool) -> FailureDecision:
        """A member died, hung or was found gone (``how``)."""
        if in_running_generation:
            return FailureDecision(Action.REGROUP, f"worker {worker_id} lost")
        return FailureDecision(Action.NONE, f"{worker_id} lost outside a running generation: {how}")

    def collective_error(self, worker_id: str, current_and_running: bool) -> FailureDecision:
        """A member reports that a collective of its generation failed (a peer died or hung). A report
        from an older generation, or one that arrives while a regroup is under way, changes nothing."""
        if current_and_running:
            return FailureDecision(Action.REGROUP, "a collective failed")
        return FailureDecision(Action.NONE, f"collective error from {worker_id} after its generation ended")

    def worker_error(
        self,
        worker_id: str,
        error: str,
        errors: dict[str, str],
        members: list[str],
        in_running_generation: bool,
    ) -> FailureDecision:
        """A worker reports an error of its own (an exception in its training loop) and exits.
        ``errors``: the errors reported so far by members of its generation, this one included
        (worker id → error); ``members``: the generation's members that could still report (those
        not gone for another cause); ``in_running_generation``: it was a member of the generation
        that is running. ``FAIL`` once every member has reported an error, else the reporter is a
        lost worker: ``REGROUP`` in a running generation, ``NONE`` otherwise."""
        if members and all(w in errors for w in members):
            first = errors.get(members[0], error)
            if first.startswith("training diverged"):
                return FailureDecision(Action.FAIL, first)
            same = sum(1 for w in members if errors[w] == first)
            who = members[0]
            if len(members) == 1:
                return FailureDecision(Action.FAIL, f"worker {who} failed: {first}")
            return FailureDecision(
                Action.FAIL,
                f"every worker failed ({same} of {len(members)} with the same error); worker {who}: {first}",
            )
        if in_running_generation:
            return FailureDecision(Action.REGROUP, f"worker {worker_id} lost: it reported an error: {error}")
        return FailureDecision(
            Action.NONE, f"worker {worker_id} reported an error outside a running generation"
        )

    def too_few_workers(
        self, alive: int, waited_s: float, checkpoint_step: int, checkpointing: bool
    ) -> FailureDecision:
        """Fewer than ``cluster.min_workers`` alive, for ``waited_s`` so far. The deadline does not run
        out while the live state is being written as a checkpoint (``checkpointing``)."""
        limit = self.cluster.wait_for_workers_s
        if checkpointing or waited_s <= limit:
            return FailureDecision(
                Action.WAIT, f"{alive} worker(s) alive, cluster.min_workers is {self.cluster.min_workers}"
            )
        return FailureDecision(
            Action.FAIL,
            f"only {alive} worker(s) alive, fewer than cluster.min_workers={self.cluster.min_workers}, for "
            f"{limit:g} s (cluster.wait_for_workers_s); the last checkpoint is at step {checkpoint_step}",
        )

    def start_up(
        self, ready: int, target: int, waited_s: float, can_come: int | None = None, lost: str = ""
    ) -> FailureDecision:
        """The first generation of this coordinator is not formed yet: ``ready`` workers have loaded
        their model, ``target`` were asked for, ``waited_s`` have passed since the coordinator started.
        ``can_come``: how many of them can still come, where a launcher knows (``lepton train``'s local
        workers; None: any number may), and ``lost``, why the others cannot (one line, naming them)."""
        c = self.cluster
        want = target if can_come is None else min(target, can_come)
        if can_come is not None and can_come < c.min_workers:
            return FailureDecision(
                Action.FAIL,
                f"{lost}; {can_come} of {target} workers left,"
                f" fewer than cluster.min_workers={c.min_workers}",
            )
        if ready >= max(1, want):
            why = f"{ready} of {target} workers ready" + (f" ({lost})" if want < target else "")
            return FailureDecision(Action.START, why)
        if waited_s >= c.start_grace_s and ready >= c.min_workers:
            return FailureDecision(
                Action.START,
                f"{ready} of {target} workers ready after cluster.start_grace_s={c.start_grace_s:g} s,"
                f" at least cluster.min_workers={c.min_workers}: starting with them",
            )
        if waited_s >= c.start_timeout_s:
            return FailureDecision(
                Action.FAIL,
                f"training did not start within cluster.start_timeout_s={c.start_timeout_s:g} s:"
                f" {ready} of {target} workers ready, cluster.min_workers is {c.min_workers}"
                + (f" ({lost})" if lost else ""),
            )
        return FailureDecision(Action.WAIT, f"{ready}/{want} workers ready")

    def local_exit(self, code: int, restarts: int, run_final: bool) -> FailureDecision:
        """A local worker process of ``lepton train`` exited with ``code``; ``restarts`` have been made."""
        if code == 0 or run_final or not self.cluster.restart_failed:
            return FailureDecision(Action.NONE, f"a local worker exited with code {code}")
        if restarts >= self.cluster.max_restarts:
            return FailureDecision(
                Action.NONE, f"no restart left (cluster.max_restarts={self.cluster.max_restarts})"
            )
        return FailureDecision(
            Action.RESTART_LOCAL,
            f"restarted a local worker that exited with code {code}"
            f" ({restarts + 1}/{self.cluster.max_restarts})",
        )

    def no_local_workers(self, restarts: int) -> FailureDecision:
        """Every local worker process has exited while the run goes on."""
        if self.cluster.restart_failed:
            limit = self.cluster.max_restarts
            why = f"local workers keep failing ({restarts} restart(s), cluster.max_restarts={limit})"
        else:
            why = "every local worker exited"
        return FailureDecision(Action.FAIL, why)
