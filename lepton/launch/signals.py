"""Interrupts of a running job: one policy for ``lepton train`` and ``lepton coordinator``.

The signal handler only counts (``InterruptCounter``); the coordinator's poll loop acts on the count
(``InterruptPolicy.apply``), so the handler never needs the coordinator's lock, which the interrupted
code may hold. First interrupt: checkpoint at the next step boundary, then stop. Second: stop at once
(the last checkpoint is kept; ``lepton train`` also kills its local workers).
"""

from __future__ import annotations

import signal
import threading


class InterruptCounter:
    """Counts SIGINT/SIGTERM while training. The handler only counts: the poll loop acts on it, so
    the handler never needs the coordinator's lock (which the interrupted code may hold)."""

    def __init__(self):
        self.count = 0
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        self.count += 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class InterruptPolicy:
    """What the n-th interrupt does to the job (module doc). Call ``apply`` from the poll loop with the
    coordinator's lock held; ``forced`` tells the launcher that the job was stopped at once."""

    FIRST = "interrupted: checkpoint at the next step boundary, then stop"
    SECOND = "interrupted twice: stopped at once (the last checkpoint is kept)"

    def __init__(self):
        self.handled = 0
        self.forced = False

    def apply(self, interrupts: int, coord) -> None:
        if interrupts <= self.handled:
            return
        self.handled = interrupts
        if interrupts == 1:
            coord.request_stop(self.FIRST)
        else:
            self.forced = True
            coord.stop_now(self.SECOND)
