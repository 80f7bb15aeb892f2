"""The worker's line to the coordinator off the training path: a thread that sends heartbeats and the
queued metric records every ``interval`` seconds, and keeps what the replies say (a regroup request,
the newest share plan, an exit) for the training loop to read at a step boundary."""

from __future__ import annotations

import threading

from ..client import CoordinatorClient
from ..errors import LeptonError
from ..protocol import Heartbeat, StepPlan
from ..records import MetricRecord


class Reporter(threading.Thread):
    """Sends heartbeats and queued metric records every ``interval`` seconds, off the training path.
    While the coordinator is unreachable the records are kept and resent."""

    def __init__(self, client: CoordinatorClient, worker_id: str, interval: float):
        super().__init__(name="lepton-reporter", daemon=True)
        self.client = client
        self.worker_id = worker_id
        self.interval = interval
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.fields: dict = {"state": "waiting"}  # the next heartbeat's content, set at step boundaries
        self.regroup_generation: int | None = None
        self.plan: StepPlan | None = None  # the newest share plan the coordinator sent
        self.exit_requested = threading.Event()
        self._closing = threading.Event()
        self._soon = threading.Event()  # set: send the next heartbeat now, not at the interval
        # beats go out from this thread, the training loop's (before a report) and the checkpoint
        # writer's: one at a time, or records could land out of order and an older reply's
        # regroup_generation overwrite a newer one's
        self._sending = threading.Lock()

    def update(self, **fields) -> None:
        """Called every step: a dict update only; the Heartbeat is built when it is sent."""
        with self.lock:
            self.fields.update(fields)

    def push(self, record: MetricRecord) -> None:
        """Queue a metrics.jsonl record for the next heartbeat."""
        line = record.to_dict()
        with self.lock:
            self.records.append(line)

    def flush(self) -> None:
        with self._sending:
            with self.lock:
                records, self.records = self.records, []
                beat = Heartbeat(worker_id=self.worker_id, records=records, **self.fields)
            try:
                reply = self.client.heartbeat(beat)
                self.regroup_generation = reply.regroup_generation
                if reply.plan is not None:
                    self.plan = reply.plan
                if reply.action == "exit":
                    self.exit_requested.set()
            except LeptonError:
                with self.lock:
                    self.records = records + self.records

    def beat_now(self) -> None:
        """Send the current fields without waiting for the interval (a first speed measurement: the
        balancer can plan a few hundred steps earlier)."""
        self._soon.set()

    def run(self) -> None:
        while True:
            self._soon.wait(self.interval)
            self._soon.clear()
            if self._closing.is_set():
                return
            self.flush()

    def close(self) -> None:
        self._closing.set()
        self._soon.set()
        self.join(timeout=5)
        self.flush()
