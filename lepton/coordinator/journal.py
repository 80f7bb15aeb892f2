"""The run journal: observers of the controller that write what it decides into the run directory.

The controller never writes a file. It tells its observers (Ray Train v2's ``ControllerCallback``)
four things: an event (every phase transition is one, plus decisions and incidents), metric records
from workers, a new snapshot of its persistent state, and the final summary. The sinks here turn
them into events.jsonl, metrics.jsonl, state.json, summary.json and TensorBoard event files. Unit
tests of the controller can run with no sink at all.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..storage.rundir import TENSORBOARD_DIR, RunDir
from .tensorboard import TensorBoardSink

# state.json for progress alone (the step of a metrics report) is written at most this often
PROGRESS_PERSIST_S = 1.0


class Observer:
    """What the controller tells; every method is optional (the defaults do nothing). Called under
    the coordinator's lock, so a sink must be quick: a small write, no network."""

    def on_event(self, event: dict) -> None:
        pass

    def on_records(self, records: list[dict]) -> None:
        pass

    def on_state(self, state: dict, progress: bool) -> None:
        """``state`` is what state.json should hold. ``progress``: only the step moved (a metrics
        report, several a second); a sink may write such a change later."""

    def on_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class EventsFile(Observer):
    def __init__(self, run: RunDir):
        self.run = run

    def on_event(self, event: dict) -> None:
        self.run.append_event(event)

    def close(self) -> None:
        self.run.flush()  # an object store's queued segments (storage/backend.py)


class MetricsFile(Observer):
    def __init__(self, run: RunDir):
        self.run = run

    def on_records(self, records: list[dict]) -> None:
        for rec in records:
            self.run.append_metric(rec)

    def close(self) -> None:
        self.run.flush()


class TensorBoardFiles(Observer):
    """TensorBoard's writer needs a local folder: on a run elsewhere (an object store) it writes into a
    temporary one whose files are copied into the run's ``tensorboard/`` when the run ends."""

    def __init__(self, run: RunDir):
        self.run = run
        self.local = None if run.is_local else Path(tempfile.mkdtemp(prefix="lepton-tensorboard-"))
        self.sink = TensorBoardSink(self.local or run.tensorboard_dir)

    def on_records(self, records: list[dict]) -> None:
        for rec in records:
            self.sink.record(rec)

    def close(self) -> None:
        self.sink.close()
        if self.local is not None:
            for f in sorted(self.local.rglob("*")):
                if f.is_file():
                    self.run.copy_in(f, f"{TENSORBOARD_DIR}/{f.relative_to(self.local).as_posix()}")
            shutil.rmtree(self.local, ignore_errors=True)


class StateFile(Observer):
    """state.json, written atomically (fsynced) when it changes. A change of the step and epoch
    alone is written at most every ``PROGRESS_PERSIST_S``, the rest by the controller's next tick:
    each write is an fsync under the server's lock, and resuming needs the checkpoint pointer, which
    is written at once like every other change."""

    def __init__(self, run: RunDir, clock: Callable[[], float] = time.monotonic):
        self.run, self.clock = run, clock
        self.written: Optional[dict] = None
        self.written_at = 0.0

    def on_state(self, state: dict, progress: bool) -> None:
        last = self.written
        if state == last:
            return
        now = self.clock()
        if (
            progress
            and last is not None
            and now - self.written_at < PROGRESS_PERSIST_S
            and all(state[k] == last.get(k) for k in state if k not in ("step", "epoch"))
        ):
            return
        self.run.write_state(state)
        self.written, self.written_at = state, now


class SummaryFile(Observer):
    def __init__(self, run: RunDir):
        self.run = run

    def on_summary(self, summary: dict) -> None:
        self.run.write_summary(summary)


def run_journal(run: RunDir, clock: Callable[[], float] = time.monotonic) -> list[Observer]:
    """The sinks of a run directory, in the order they are told."""
    return [EventsFile(run), MetricsFile(run), TensorBoardFiles(run), StateFile(run, clock), SummaryFile(run)]
