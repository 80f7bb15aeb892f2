"""Starting a job: open the run, start its coordinator, run and supervise local workers.

``lepton train`` = ``open_local`` (``open_run`` + K ``lepton worker`` subprocesses) + ``run_local``.
``lepton coordinator`` = ``open_run`` + ``start_coordinator`` without the subprocesses. Both apply
the same interrupt policy (``signals``). A fine-tune of the export phase launches through here too.

Modules: ``run`` (``open_run``, its checks, ``start_coordinator``), ``local`` (``LocalWorkers``,
``LocalSupervisor``, ``open_local``, ``run_local``), ``signals`` (``InterruptCounter``,
``InterruptPolicy``).
"""

from __future__ import annotations

from .local import LocalLaunch, LocalOutcome, LocalSupervisor, LocalWorkers, open_local, run_local
from .run import OpenRun, default_run_dir, open_run, start_coordinator
from .signals import InterruptCounter, InterruptPolicy

__all__ = [
    "InterruptCounter",
    "InterruptPolicy",
    "LocalLaunch",
    "LocalOutcome",
    "LocalSupervisor",
    "LocalWorkers",
    "OpenRun",
    "default_run_dir",
    "open_local",
    "open_run",
    "run_local",
    "start_coordinator",
]
