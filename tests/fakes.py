"""Fakes shared by the unit tests: a clock the test moves by hand, and a coordinator stepped by fake
workers (no network, no sleeps)."""

import json

from conftest import job_dict
from lepton.coordinator.controller import Controller
from lepton.protocol import Heartbeat, RegisterRequest
from lepton.spec import parse_job
from lepton.storage.rundir import RunDir


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_coordinator(tmp_path, workers=2, **job_over):
    clock = Clock()
    job = parse_job(job_dict(tmp_path / "d.csv", **job_over))
    return Controller(job, RunDir(tmp_path / "run"), workers, train_rows=100, clock=clock), clock


def ready(c, pid):
    """A fake worker: registers, then asks for its plan once its model is built."""
    wid = c.register(RegisterRequest(host="h", pid=pid))
    c.plan(wid)
    return wid


def event_kinds(tmp_path):
    return [json.loads(l)["kind"] for l in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]


def measure(c, w, step, version, samples, busy, compute):
    return c.heartbeat(
        Heartbeat(
            worker_id=w,
            generation=0,
            step=step,
            plan_version=version,
            step_samples=samples,
            step_busy_s=busy,
            step_compute_s=compute,
            step_compute_fixed_s=0.0,
        )
    )


class Crashing:
    """A storage that raises ``SystemExit`` at its ``after``-th write, move or delete: a writer killed
    at that point (an object store shows an object only once its upload completed)."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.calls = inner, after, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("write", "open_write", "put", "delete", "move"):
            return attr

        def op(*a, **k):
            self.calls += 1
            if self.calls == self.after:
                raise SystemExit(f"killed at {name} #{self.calls}")
            return attr(*a, **k)

        return op
