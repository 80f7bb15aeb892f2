"""The worker loop in one process: ranks are threads sharing an in-process group (tests/fake_group.py).

No coordinator and no worker processes: each test takes seconds.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import job_dict
from fake_group import FakeCluster, FakeGroup
from lepton.comm import CommError
from lepton.protocol import Generation, HeartbeatResponse
from lepton.records import (
    RECORD_TYPES,
    BestRecord,
    DecisionRecord,
    EvalRecord,
    GenerationFirstStepRecord,
    PlanRecord,
    SkippedStepRecord,
    TrainRecord,
    UnknownRecord,
    parse_record,
)
from lepton.spec import parse_job
from lepton.storage.preprocess import ColumnStats, Preprocessor
from lepton.storage.rundir import RunDir
from lepton.worker.fault_injection import FaultInjector
from lepton.worker.lifecycle import GenerationOutcome, Worker
from lepton.worker.reporter import Reporter
from lepton.worker.step_control import ReducedControl, Slot, StepControl, slots
from lepton.worker.trainer import Trainer

pytestmark = pytest.mark.timeout(120)

FEATURES = 4


class _Cache:
    """The trainer's view of the prepared data: a preprocessor and the splits."""

    def __init__(self, rows: int = 96):
        rng = np.random.default_rng(0)
        self.preprocessor = Preprocessor(
            [ColumnStats(f"f{i}", "numeric") for i in range(FEATURES)],
            "label",
            "classification",
            ["a", "b", "c"],
        )
        x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
        self.splits = {"train": (x, y), "val": (x[:24], y[:24]), "test": (x[24:48], y[24:48])}

    def get(self, split):
        return self.splits[split]


class _Client:
    """The coordinator, as far as a worker in a generation talks to it: it records the reports."""

    def __init__(self):
        self.reports = []
        self.records = []  # the metrics records the heartbeats carried
        self.lock = threading.Lock()

    def heartbeat(self, beat):
        with self.lock:
            self.records.extend(beat.records)
        return HeartbeatResponse()

    def report(self, report):
        with self.lock:
            self.reports.append(report)


def _job(**over):
    base = {"train__epochs": 2, "train__batch_size": 12, "checkpoint__every_steps": 0}
    return parse_job(job_dict("d.csv", **{**base, **over}))


def _worker(job, tmp_path, group, client) -> Worker:
    reporter = Reporter(client, "w", interval=60.0)  # not started: records wait for a flush
    return Worker(
        job=job,
        run=RunDir(tmp_path),
        trainer=Trainer(job, _Cache()),
        group=group,
        client=client,
        reporter=reporter,
        faults=FaultInjector(""),
    )


def _generation(rank: int, world: int, gen_id: int = 0) -> Generation:
    return Generation(
        id=gen_id,
        rank=rank,
        world=world,
        shares=[1.0 / world] * world,
        members=[f"w{r}" for r in range(world)],
    )


def _in_threads(fn, world: int) -> list:
    """fn(rank) on ``world`` threads; their results in rank order (an exception is re-raised)."""
    results: list = [None] * world
    errors: list = []

    def run(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


# --- the control slots ------------------------------------------------------------------------------


def test_step_control_round_trips_through_the_extra_slots():
    extra = torch.zeros(slots(3))
    StepControl(loss_sum=2.5, samples=4, regroup=True, next_plan=[0.25, 0.5, 0.25]).pack(extra, 3)
    assert extra[Slot.REGROUP_VOTES] == 1 and extra[Slot.PLAN_VOTES] == 1
    assert ReducedControl.unpack(extra, 3) == ReducedControl(2.5, 4, True, [0.25, 0.5, 0.25])


def test_step_control_sums_votes_counts_and_plans_over_ranks():
    world = 3
    packed = []
    for rank, (plan, vote) in enumerate([([0.2, 0.3, 0.5], False), (None, False), ([0.2, 0.3, 0.5], False)]):
        extra = torch.zeros(slots(world))
        StepControl(loss_sum=float(rank), samples=rank + 1, regroup=vote, next_plan=plan).pack(extra, world)
        packed.append(extra)
    reduced = ReducedControl.unpack(sum(packed), world)
    assert (reduced.loss_sum, reduced.samples, reduced.regroup) == (3.0, 6, False)
    assert reduced.next_shares == pytest.approx([0.2, 0.3, 0.5])  # the mean of the ranks that knew it
    nobody = ReducedControl.unpack(torch.zeros(slots(world)), world)
    assert nobody.next_shares is None and not nobody.regroup


# --- the trainer's step -----------------------------------------------------------------------------


def _flat_params(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def test_two_fake_ranks_make_the_update_of_one_rank_over_the_same_batch():
    job = _job()
    alone = Trainer(job, _Cache())
    alone.train_step(FakeGroup(), [1.0], 0)
    cluster = FakeCluster()
    # built here, one after the other: model init seeds and draws from torch's global generator, and two
    # threads building at once interleave their draws (different initial weights, a flaky test)
    trainers = [Trainer(job, _Cache()) for _ in range(2)]

    def rank_step(rank):
        group = cluster.group()
        group.join(0, rank, 2, 0)
        trainer = trainers[rank]
        result = trainer.train_step(group, [0.5, 0.5], rank)
        return trainer, result

    (first, result0), (second, result1) = _in_threads(rank_step, 2)
    assert result0.batch == result1.batch == 12 and result0.local + result1.local == 12
    assert result0.loss == result1.loss
    assert torch.equal(_flat_params(first), _flat_params(second))  # one replica
    assert torch.allclose(_flat_params(first), _flat_params(alone), rtol=1e-5, atol=1e-6)
    assert first.step == alone.step == 1


def test_a_plan_known_to_one_rank_reaches_every_rank_in_the_same_step():
    job = _job()
    cluster = FakeCluster()

    def rank_step(rank):
        group = cluster.group()
        group.join(0, rank, 2, 0)
        trainer = Trainer(job, _Cache())
        return trainer.train_step(
            group, [0.5, 0.5], rank, regroup=rank == 1, next_plan=[0.25, 0.75] if rank == 0 else None
        )

    results = _in_threads(rank_step, 2)
    assert [r.next_shares for r in results] == [[0.25, 0.75]] * 2
    assert [r.regroup for r in results] == [True, True]


# --- the worker loop --------------------------------------------------------------------------------


def test_a_comm_error_on_one_rank_pauses_every_rank_at_the_step_reached(tmp_path):
    job = _job()
    cluster = FakeCluster()
    cluster.fail_at(rank=1, allreduce=3)  # no evaluation before it: the fourth step fails
    client = _Client()
    workers = [_worker(job, tmp_path, cluster.group(), client) for _ in range(2)]
    outcomes = _in_threads(lambda rank: workers[rank]._run_generation(_generation(rank, 2)), 2)
    assert outcomes == [GenerationOutcome.PAUSED] * 2
    assert [w.trainer.step for w in workers] == [3, 3]
    paused = [r.payload for r in client.reports if r.kind == "paused"]
    assert [(p.reason, p.step) for p in paused] == [("collective_error", 3)] * 2


def test_a_regroup_vote_on_one_rank_pauses_every_rank_after_the_same_step(tmp_path):
    job = _job()
    cluster = FakeCluster()
    client = _Client()
    workers = [_worker(job, tmp_path, cluster.group(), client) for _ in range(2)]
    workers[1].reporter.regroup_generation = 0  # the coordinator asked rank 1 to end generation 0
    outcomes = _in_threads(lambda rank: workers[rank]._run_generation(_generation(rank, 2)), 2)
    assert outcomes == [GenerationOutcome.PAUSED] * 2
    assert [w.trainer.step for w in workers] == [1, 1]
    assert sorted(r.payload.reason for r in client.reports if r.kind == "paused") == ["regroup"] * 2


def test_train_steps_returns_finished_and_rank_0_writes_typed_records(tmp_path):
    job = _job(**{"policies": {"keep_best": {"metric": "val.loss", "mode": "min"}}})
    cluster = FakeCluster()
    clients = [_Client(), _Client()]
    workers = [_worker(job, tmp_path, cluster.group(), client) for client in clients]

    def generation(rank):
        worker = workers[rank]
        worker.generation = 0  # what _run_generation sets before it joins
        worker.group.join(0, rank, 2, 0)
        outcome = worker._train_steps(_generation(rank, 2))
        return outcome, worker._finish_run(_generation(rank, 2))

    (outcome0, summary), (outcome1, nothing) = _in_threads(generation, 2)
    assert outcome0 is outcome1 is GenerationOutcome.FINISHED and nothing is None
    total = workers[0].trainer.total_steps
    assert summary["steps"] == total and summary["replicas_agree"]
    workers[0].reporter.flush()
    workers[1].reporter.flush()
    lines = clients[0].records
    assert clients[1].records == []  # rank 0 writes the records
    kinds = {line["kind"] for line in lines}
    assert {"generation_first_step", "train", "eval", "best"} <= kinds
    for line in lines:
        assert parse_record(line).to_dict() == line
    train = [line for line in lines if line["kind"] == "train"]
    assert train[-1]["step"] == total and train[-1]["workers"] == 2


def test_a_worker_that_is_leaving_ends_its_generation_as_left(tmp_path):
    job = _job()
    worker = _worker(job, tmp_path, FakeGroup(), _Client())
    worker.leaving = True
    assert worker._run_generation(_generation(0, 1)) is GenerationOutcome.LEFT
    assert worker.trainer.step == 1


def test_the_fake_group_turns_a_broken_peer_into_comm_errors():
    cluster = FakeCluster(timeout_s=5)
    cluster.fail_at(rank=0, allreduce=0)

    def reduce(rank):
        group = cluster.group()
        group.join(7, rank, 2, 0)
        try:
            group.allreduce(torch.ones(2))
        except CommError as e:
            return str(e)

    messages = _in_threads(reduce, 2)
    assert all("rank 0 failed at allreduce 0" in m for m in messages)


# --- metrics records --------------------------------------------------------------------------------

LINES = [
    {
        "kind": "train",
        "time": 1.5,
        "step": 5,
        "epoch": 0,
        "total_steps": 42,
        "loss": 0.7,
        "lr": 0.01,
        "samples_per_s": None,
        "generation": 0,
        "workers": 2,
    },
    {
        "kind": "eval",
        "split": "val",
        "time": 1.5,
        "step": 14,
        "epoch": 1,
        "count": 36,
        "loss": 0.4,
        "accuracy": 0.9,
        "confusion": [[1, 0], [0, 1]],
    },
    {"kind": "best", "time": 1.5, "step": 14, "value": 0.4, "metric": "val.loss"},
    {
        "kind": "decision",
        "decision": "early_stop",
        "time": 1.5,
        "step": 28,
        "reason": "no improvement",
        "details": {"patience": 2},
        "lr": 0.01,
    },
    {"kind": "plan", "time": 1.5, "step": 10, "version": 1, "shares": [0.25, 0.75]},
    {
        "kind": "skipped_step",
        "time": 1.5,
        "step": 4,
        "lr_scale": 0.5,
        "reason": "non-finite loss or gradient",
    },
    {"kind": "generation_first_step", "generation": 1, "step": 11, "time": 1.5, "transport": "shm"},
]


def test_every_record_kind_writes_the_line_it_reads_keys_in_order():
    assert sorted(RECORD_TYPES) == sorted(line["kind"] for line in LINES)
    for line in LINES:
        record = parse_record(line)
        assert record.to_dict() == line and list(record.to_dict()) == list(line)


def test_records_built_by_the_worker_have_todays_keys():
    built = [
        TrainRecord(
            time=1.5,
            step=5,
            epoch=0,
            total_steps=42,
            loss=0.7,
            lr=0.01,
            samples_per_s=None,
            generation=0,
            workers=2,
        ),
        EvalRecord(
            split="val",
            time=1.5,
            step=14,
            epoch=1,
            metrics={"count": 36, "loss": 0.4, "accuracy": 0.9, "confusion": [[1, 0], [0, 1]]},
        ),
        BestRecord(time=1.5, step=14, value=0.4, metric="val.loss"),
        DecisionRecord(
            decision="early_stop",
            time=1.5,
            step=28,
            reason="no improvement",
            details={"patience": 2},
            lr=0.01,
        ),
        PlanRecord(time=1.5, step=10, version=1, shares=[0.25, 0.75]),
        SkippedStepRecord(time=1.5, step=4, lr_scale=0.5),
        GenerationFirstStepRecord(generation=1, step=11, time=1.5, transport="shm"),
    ]
    assert [list(r.to_dict().items()) for r in built] == [list(line.items()) for line in LINES]


def test_parse_record_refuses_unknown_kinds_and_missing_fields():
    with pytest.raises(UnknownRecord):
        parse_record({"kind": "gossip", "step": 1})
    with pytest.raises(TypeError, match="loss"):
        parse_record({k: v for k, v in LINES[0].items() if k != "loss"})
