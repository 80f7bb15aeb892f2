"""Unit level: the sampler, the spec, preprocessing, and the coordinator stepped against fake workers."""
import json
import threading
import time
import warnings

import numpy as np
import pytest

from lepton.coordinator.machine import Coordinator, Phase
from lepton.coordinator.server import build_app
from lepton.errors import DataError, LeptonError, SpecError
from lepton.protocol import Heartbeat, RegisterRequest, Report, Resources
from lepton.sampler import GlobalBatchSampler, split_counts
from lepton.spec import parse_job
from lepton.storage.prepared import prepare
from lepton.storage.rundir import RunDir
from conftest import job_dict


# --- sampler ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("total,weights", [(16, [1, 1]), (17, [1, 2, 5]), (5, [1, 1, 1]), (2, [1, 1, 1]),
                                           (512, [0.7, 0.2, 0.1]), (3, [100, 1, 1])])
def test_split_counts_sum_and_floor(total, weights):
    c = split_counts(total, weights)
    assert sum(c) == total and len(c) == len(weights)
    if total >= len(weights):
        assert min(c) >= 1


@pytest.mark.parametrize("shares", [[1.0], [1, 1], [1, 2, 5], [5, 1, 1, 1]])
def test_sampler_covers_each_epoch_exactly_once(shares):
    s = GlobalBatchSampler(103, 16, seed=7)
    for epoch in range(2):
        seen = []
        for step in range(epoch * s.steps_per_epoch, (epoch + 1) * s.steps_per_epoch):
            parts = [s.worker_slice(step, shares, r)[0] for r in range(len(shares))]
            assert np.array_equal(np.concatenate(parts), s.global_batch(step))
            seen += np.concatenate(parts).tolist()
        assert sorted(seen) == list(range(103))


def test_sampler_is_deterministic_and_reshuffles():
    a, b = GlobalBatchSampler(50, 8, 1), GlobalBatchSampler(50, 8, 1)
    assert np.array_equal(a.permutation(3), b.permutation(3))
    assert not np.array_equal(a.permutation(0), a.permutation(1))


# --- spec -----------------------------------------------------------------------------------------
def test_spec_defaults_and_overrides(tmp_path):
    job = parse_job(job_dict(tmp_path / "d.csv"), overrides=["train.epochs=7", "cluster.shares=[1,3]"])
    assert job.train.epochs == 7 and job.cluster.shares == [1, 3]
    assert job.data.preprocess.normalize == "standard"


@pytest.mark.parametrize("over,needle", [
    ({"model__type": "rnn"}, "model.type"),
    ({"train__batch_size": 0}, "train.batch_size"),
    ({"data__split": {"train": 0.5, "val": 0.1, "test": 0.1}}, "must be 1.0"),
    ({"cluster__shares": [1, 2, 3]}, "cluster.shares has 3 entries for 2 workers"),
    ({"model__layers": [{"units": 0}]}, "greater than 0"),
])
def test_spec_errors_name_the_field(tmp_path, over, needle):
    with pytest.raises(SpecError, match=None) as e:
        parse_job(job_dict(tmp_path / "d.csv", **over))
    assert needle in str(e.value)


# --- preprocessing ----------------------------------------------------------------------------------
def _prep(tmp_path, text, **over):
    p = tmp_path / "d.csv"
    p.write_text(text)
    return prepare(parse_job(job_dict(p, **over)))


def test_dedupe_impute_and_categorical(tmp_path):
    rows = ["x,color,label"] + [f"{i % 7},{'red' if i % 2 else 'blue'},{'a' if i % 3 else 'b'}" for i in range(40)]
    rows += ["1,red,a", ",blue,b"]
    pre = _prep(tmp_path, "\n".join(rows) + "\n", data__preprocess={"missing": "mean", "dedupe": True,
                                                                     "normalize": "minmax"})
    assert pre.report["duplicates_dropped"] > 0
    assert pre.report["missing_features"] == 1
    x = np.concatenate([pre.arrays[f"{s}_x"] for s in ("train", "val", "test")])
    assert x.shape[1] == 3                                   # x + one-hot(blue, red)
    assert not np.isnan(x).any()
    onehot = x[:, 1:]
    assert set(onehot.sum(1).tolist()) == {1.0}
    train = pre.arrays["train_x"][:, 0]
    assert train.min() == pytest.approx(0) and train.max() == pytest.approx(1)   # fitted on train only


def test_statistics_fitted_on_train_only(tmp_path):
    rows = ["x,label"] + [f"{i},{'a' if i % 2 else 'b'}" for i in range(100)]
    pre = _prep(tmp_path, "\n".join(rows) + "\n")
    tr = pre.arrays["train_x"][:, 0]
    assert tr.mean() == pytest.approx(0, abs=1e-6) and tr.std() == pytest.approx(1, abs=1e-5)
    assert abs(pre.arrays["test_x"][:, 0].mean()) > 1e-4


def test_single_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="single class"):
        _prep(tmp_path, "x,label\n1,a\n2,a\n3,a\n")


# --- coordinator state machine against fake workers -------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _coordinator(tmp_path, workers=2, **job_over):
    clock = Clock()
    job = parse_job(job_dict(tmp_path / "d.csv", **job_over))
    return Coordinator(job, RunDir(tmp_path / "run"), workers, train_rows=100, clock=clock), clock


def _ready(c, pid):
    """A fake worker: registers, then asks for its plan once its model is built."""
    wid = c.register(RegisterRequest(host="h", pid=pid))
    c.plan(wid)
    return wid


def _kinds(tmp_path):
    return [json.loads(l)["kind"] for l in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]


def test_heartbeat_records_reach_metrics_and_state_json_is_throttled(tmp_path):
    """Metrics records ride in heartbeats; a step that only progress moved reaches state.json at most
    every PROGRESS_PERSIST_S (or at the next tick once due), anything else at once."""
    c, clock = _coordinator(tmp_path, 2)
    a, b = _ready(c, 1), _ready(c, 2)
    gen = c.plan(a).generation.id
    state = lambda: json.loads((tmp_path / "run" / "state.json").read_text())
    train = lambda step: {"kind": "train", "step": step, "loss": 1.0, "samples_per_s": 10.0}
    clock.t = 5.0
    c.heartbeat(Heartbeat(worker_id=a, generation=gen, step=1, records=[train(1)]))
    assert state()["step"] == 1                      # a second after the last write: written at once
    clock.t = 5.2
    c.heartbeat(Heartbeat(worker_id=a, generation=gen, step=2, records=[train(2)]))
    assert c.step == 2 and state()["step"] == 1                   # progress alone, too soon
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 2, "path": "/x"}))
    assert state()["step"] == 2 and state()["latest_checkpoint"]["step"] == 2     # at once
    clock.t = 5.4
    c.heartbeat(Heartbeat(worker_id=b, generation=gen, step=3, records=[train(3)]))
    c.tick()
    assert state()["step"] == 2
    clock.t = 6.3
    c.tick()                                                       # due: the tick writes it
    assert state()["step"] == 3
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_machine_forms_generation_and_completes(tmp_path):
    c, clock = _coordinator(tmp_path, 2, cluster__shares=[1, 3])
    a = c.register(RegisterRequest(host="h", pid=1))
    b = c.register(RegisterRequest(host="h", pid=2))
    assert c.phase == Phase.WAITING                       # registered but not ready yet
    assert c.plan(a).action == "wait"
    assert c.plan(b).action == "run" and c.phase == Phase.RUNNING
    pa, pb = c.plan(a), c.plan(b)
    assert (pa.generation.rank, pb.generation.rank) == (0, 1)
    assert pa.generation.shares == [1, 3] and pa.generation.world == 2
    assert c.total_steps == 7 * 3
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 5, "path": "/x"}))
    assert json.loads((tmp_path / "run" / "state.json").read_text())["latest_checkpoint"]["step"] == 5
    c.report(Report(worker_id=a, kind="finished", payload={"summary": {"steps": 21, "test": {"accuracy": 1.0}}}))
    assert c.phase == Phase.RUNNING                       # b has not finished yet
    clock.t = 3.0
    c.report(Report(worker_id=b, kind="finished"))
    assert c.phase == Phase.COMPLETED
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["workers"] == 2 and s["wall_s"] == 3.0 and s["steps"] == 21
    assert c.plan(a).action == "exit" and c.heartbeat(Heartbeat(worker_id=b)).action == "exit"


def _measure(c, w, step, version, samples, busy, compute):
    return c.heartbeat(Heartbeat(worker_id=w, generation=0, step=step, plan_version=version,
                                 step_samples=samples, step_busy_s=busy, step_compute_s=compute,
                                 step_compute_fixed_s=0.0))


def test_machine_replans_as_soon_as_every_speed_is_in(tmp_path):
    c, _ = _coordinator(tmp_path, 2)
    a, b = _ready(c, 1), _ready(c, 2)
    assert c.phase == Phase.RUNNING and c.shares == [0.5, 0.5]
    # a's first full window: the re-plan is due but waits for b's
    assert _measure(c, a, 11, 0, 8, 1e-3, 0.8e-3).plan is None
    # b (3x slower per sample) completes the set: the plan comes in its reply (b's next reduction
    # carries it to a), and in a's next reply while a still reports the old plan
    r = _measure(c, b, 11, 0, 8, 2.6e-3, 2.4e-3)
    assert r.plan.version == 1 and r.plan.generation == 0
    assert _measure(c, a, 12, 0, 8, 1e-3, 0.8e-3).plan == r.plan
    assert r.plan.shares[0] > 0.7                   # equal step ends: b's slope and both fixed costs
    # both applied v1: a measurement at the new shares replaces the old point instead of averaging it
    _measure(c, a, 24, 1, 12, 1.4e-3, 1.2e-3)
    assert c.members[a].measured == (12, 1.4e-3, 1.2e-3, 0.0)
    _measure(c, a, 30, 1, 12, 1.6e-3, 1.4e-3)       # within one plan: smoothed
    assert c.members[a].measured[1] == pytest.approx(1.5e-3)
    # b's measurement of v1 completes the set: the re-plan keeps the shares, which settles the plan
    # (re-plans every rebalance_every_steps from now on)
    _measure(c, b, 31, 1, 4, 1.5e-3, 1.2e-3)
    r = _measure(c, a, 31, 1, 12, 1.5e-3, 1.3e-3)
    assert r.plan is None and c.plan_version == 1
    assert c.plan_settled and c._replan_step() == 31 + 20
    # the first plan came from capacity-based shares and could go anywhere; later ones leave every
    # worker at least half its share, however slow one window makes it look (b: 25x slower per sample)
    assert c.shares_guessed
    before = c.step_plan.shares
    _measure(c, b, 52, 1, 4, 100e-3, 99e-3)
    r = _measure(c, a, 52, 1, 12, 1.5e-3, 1.3e-3)
    assert r.plan.version == 2 and r.plan.shares[1] == pytest.approx(before[1] / 2, rel=1e-3)


def test_fixed_shares_for_another_membership_are_balanced(tmp_path):
    """cluster.shares names one share per worker; once a worker is lost the survivors have none fixed:
    they start from capacity shares and are re-planned from their measured speeds like any others."""
    c, _ = _coordinator(tmp_path, 3, cluster__workers=3, cluster__shares=[1, 2, 5], cluster__min_workers=2)
    a, b, d = (_ready(c, pid) for pid in (1, 2, 3))
    assert c.shares == [1, 2, 5]
    for w in (a, b, d):
        _measure(c, w, 11, 0, 8, 1e-3, 0.8e-3)
    assert c.plan_version == 0                        # fixed: never re-planned
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 11}))
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 11}))
    c.process_exited(3, -9)
    assert c.generation == 1 and c.shares == [0.5, 0.5]
    beat = lambda w, busy: c.heartbeat(Heartbeat(worker_id=w, generation=1, step=22, plan_version=0, step_samples=8,
                                                 step_busy_s=busy, step_compute_s=busy, step_compute_fixed_s=0.0))
    beat(a, 1e-3)
    r = beat(b, 3e-3)                                   # b is 3x slower per sample
    assert r.plan is not None and r.plan.shares[0] == pytest.approx(0.75, abs=0.02)


def test_adopted_generation_is_replanned_only_once_every_member_is_back(tmp_path):
    """A restarted coordinator (--resume) adopts the running workers one heartbeat at a time; a plan
    made before the last one is back would have fewer shares than ranks (IndexError in the worker)."""
    job = parse_job(job_dict(tmp_path / "d.csv"))
    c = Coordinator(job, RunDir(tmp_path / "run"), 2, train_rows=100, clock=Clock(), previous_generation=3)

    def beat(w, rank, busy):
        return c.heartbeat(Heartbeat(worker_id=w, generation=3, rank=rank, world=2, state="training", step=40,
                                     plan_version=2, step_samples=8, step_busy_s=busy, step_compute_s=busy / 2))
    assert beat("w0", 0, 1e-3).plan is None and c.plan_version == 2      # the predecessor's plan 2
    plan = beat("w1", 1, 4e-3).plan                                       # both back: re-planned
    assert plan.version == 3 and len(plan.shares) == 2 and plan.shares[0] > plan.shares[1]


def test_adopted_generation_keeps_its_shares_and_capacities(tmp_path):
    """Heartbeats carry the worker's shares and resources: a restarted coordinator re-plans from the
    predecessor's plan (each share shrinks at most by balance.SHRINK) with the capacities of the
    placement, not from equal shares on a full core each."""
    job = parse_job(job_dict(tmp_path / "d.csv", train__batch_size=100))
    c = Coordinator(job, RunDir(tmp_path / "run"), 3, train_rows=1000, clock=Clock(), previous_generation=3)
    shares, cpus = [0.8, 0.1, 0.1], [[0], [1], [1]]
    for rank in range(3):
        c.heartbeat(Heartbeat(worker_id=f"w{rank}", generation=3, rank=rank, world=3, state="training", step=40,
                              plan_version=2, shares=shares, resources=Resources(cpus=1, cpu_list=cpus[rank]),
                              step_samples=100 * shares[rank], step_busy_s=3e-3 * (1, .5, .5)[rank],
                              step_compute_s=2e-3 * (1, .5, .5)[rank]))
    assert [c.members[f"w{r}"].capacity for r in range(3)] == [1.0, 0.5, 0.5]
    # each took 3 ms of its share of a core per step at these shares: balanced, the plan stays
    assert c.step_plan.shares == shares and c.plan_version == 2 and c.plan_settled
    # the predecessor's plan 3 reaches the workers after the adoption: followed, so re-plans go on
    newer = [0.7, 0.15, 0.15]
    for rank in range(3):
        c.heartbeat(Heartbeat(worker_id=f"w{rank}", generation=3, rank=rank, world=3, state="training", step=300,
                              plan_version=3, shares=newer, step_samples=100 * newer[rank],
                              step_busy_s=3e-3 * (1, .5, .5)[rank], step_compute_s=2e-3 * (1, .5, .5)[rank]))
    assert c.plan_version >= 3 and c.step_plan.version == c.plan_version
    assert c.step_plan.shares != shares


def test_a_generation_never_has_more_workers_than_the_batch_has_samples(tmp_path):
    """A rank without a sample measures no speed (the re-plan divided by it: every heartbeat then
    failed); workers beyond the batch size wait as standby, and a max_workers above it is refused."""
    c, _ = _coordinator(tmp_path, 2, train__batch_size=2)
    _ready(c, 1), _ready(c, 2)
    assert c.phase == Phase.RUNNING and len(c.generation_members) == 2
    _ready(c, 3)
    assert c.phase == Phase.RUNNING and len(c.generation_members) == 2 and "regroup" not in _kinds(tmp_path)
    with pytest.raises(Exception, match=r"cluster.max_workers \(3\) is larger than train.batch_size \(2\)"):
        parse_job(job_dict(tmp_path / "d.csv", train__batch_size=2, cluster__max_workers=3))


def test_a_worker_told_to_train_on_its_cpu_counts_its_cores_not_its_gpu(tmp_path):
    """cluster.device cpu on a host with GPUs: each worker lists its GPU in its resources, and the
    capacities counted one device each (equal shares for workers that share a core)."""
    c, _ = _coordinator(tmp_path, 3, cluster__device="cpu")
    for pid, cpus in ((1, [0]), (2, [1]), (3, [1])):
        w = c.register(RegisterRequest(host="h", pid=pid, resources=Resources(cpu_list=cpus, gpus=["H100 GPU-1"])))
        c.plan(w)
    assert [c.members[w].capacity for w in c.generation_members] == [1.0, 0.5, 0.5]


def test_member_not_yet_started_when_a_regroup_begins_still_starts(tmp_path):
    """A generation forms on one worker's plan request; another learns of it only at its next poll. If
    a regroup begins in between (here: a third worker joins), it must still be told to start, or it
    would stay 'training' for good and the coordinator would wait on it forever."""
    c, _ = _coordinator(tmp_path, 2)
    a = _ready(c, 1)
    b = _ready(c, 2)                       # forms generation 0; b is told to run, a has not asked yet
    assert c.phase == Phase.RUNNING and c.plan(b).action == "run"
    _ready(c, 3)                           # a join: regroup
    assert c.phase == Phase.REGROUPING
    pa = c.plan(a)
    assert pa.action == "run" and pa.generation.id == 0
    assert c.plan(a).action == "wait"      # told once: a second request during the regroup is not a start
    for w in (a, b):
        assert c.heartbeat(Heartbeat(worker_id=w, generation=0, step=1)).regroup_generation == 0
        c.report(Report(worker_id=w, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 1}))
    assert c.phase == Phase.RUNNING and c.generation == 1 and len(c.generation_members) == 3


def test_regroup_during_the_final_evaluation_still_completes(tmp_path):
    """Rank 1 finished; a stop request turns it into a paused member; rank 0's summary then completes
    the job instead of leaving it regrouping for good."""
    c, _ = _coordinator(tmp_path, 2)
    a, b = _ready(c, 1), _ready(c, 2)
    c.report(Report(worker_id=b, kind="finished", payload={"step": 21}))
    c.request_stop("interrupted")
    assert c.phase == Phase.REGROUPING
    c.report(Report(worker_id=a, kind="finished", payload={"step": 21, "summary": {"steps": 21}}))
    assert c.phase == Phase.COMPLETED and c.summary["steps"] == 21
    c.report(Report(worker_id=b, kind="finished", payload={"step": 21}))     # late: changes nothing
    assert _kinds(tmp_path).count("completed") == 1


def test_reports_from_a_lost_member_do_not_bring_it_back(tmp_path):
    c, clock = _coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=5, cluster__min_workers=1)
    a, b = _ready(c, 1), _ready(c, 2)
    clock.t = 6.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    c.tick()                                              # b silent for 6 s: lost
    assert c.members[b].state == "lost"
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 3}))
    c.report(Report(worker_id=b, kind="failed", payload={"error": "boom"}))
    assert c.members[b].state == "lost" and not c.phase.final
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 3}))
    assert c.phase == Phase.RUNNING and c.generation_members == [a]


def test_progress_goes_back_to_the_checkpoint_a_generation_restarts_from(tmp_path):
    """The only replica died at step 55, the checkpoint is at 40: progress (status, state.json) says 40."""
    c, _ = _coordinator(tmp_path, 1, cluster__min_workers=1)
    a = _ready(c, 1)
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 40, "path": "/ck40"}))
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=55))
    c.process_exited(1, -9)
    b = _ready(c, 2)
    assert c.generation == 1 and c.generation_start_step == 40
    assert c.status()["step"] == 40 and json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 40


def test_resume_keeps_the_recorded_generation_until_it_adopts(tmp_path):
    """A --resume coordinator that ends before any worker came back leaves state.json's generation as
    it found it: the next --resume can still adopt the live workers."""
    job = parse_job(job_dict(tmp_path / "d.csv"))
    Coordinator(job, RunDir(tmp_path / "run"), 2, train_rows=100, clock=Clock(), previous_generation=7)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["generation"] == 7

def test_machine_regroups_from_the_most_advanced_survivor(tmp_path):
    c, clock = _coordinator(tmp_path, 3)
    a, b, d = (_ready(c, pid) for pid in (1, 2, 3))
    assert c.phase == Phase.RUNNING and c.generation == 0
    for w in (a, b, d):
        c.heartbeat(Heartbeat(worker_id=w, generation=0, step=6))
    # d dies; b had completed step 7 when the collective failed, a had not
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 6}))
    assert c.phase == Phase.REGROUPING
    assert c.heartbeat(Heartbeat(worker_id=b, generation=0, step=7)).regroup_generation == 0
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 7}))
    assert c.phase == Phase.REGROUPING                    # d has not answered yet
    c.process_exited(3, -9)
    assert c.phase == Phase.RUNNING and c.generation == 1
    pb, pa = c.plan(b), c.plan(a)
    assert pb.generation.rank == 0 and pa.generation.rank == 1     # the source is rank 0
    assert pb.generation.start_step == 7 and pb.generation.resume_checkpoint is None
    assert c.plan(d).action == "exit"
    clock.t = 1.0
    c.heartbeat(Heartbeat(worker_id=b, generation=1, step=8))
    rec = [e for e in c.events if e["kind"] == "recovered"]
    assert len(rec) == 1 and rec[0]["resumed_at_step"] == 7 and rec[0]["recovery_s"] == 1.0


def test_status_shows_the_running_plan_only_after_a_worker_is_lost(tmp_path):
    """A lost member keeps the share and speed of a plan that no longer runs: `lepton status`, the
    progress bar and /metrics show the new generation's fractions, and no speed for the lost one."""
    from rich.console import Console
    from lepton.console import TrainingProgress, status_table
    c, _ = _coordinator(tmp_path, 3, cluster__balance="off", cluster__min_workers=2)
    a, b, d = (_ready(c, pid) for pid in (1, 2, 3))
    for w, speed in ((a, 180.0), (b, 90.0), (d, 12_345.0)):
        c.heartbeat(Heartbeat(worker_id=w, generation=0, step=6, samples_per_s=speed))
    assert [w["share_fraction"] for w in c.status()["workers"]] == pytest.approx([1 / 3] * 3, abs=1e-4)
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 6}))
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 6}))
    c.process_exited(3, -9)
    assert c.phase == Phase.RUNNING and c.generation == 1
    by_id = {w["worker_id"]: w for w in c.status()["workers"]}
    assert [by_id[w]["share_fraction"] for w in (a, b)] == [0.5, 0.5]
    assert by_id[d]["state"] == "lost" and by_id[d]["share_fraction"] is None and by_id[d]["samples_per_s"] is None
    rec = Console(record=True, width=200)
    rec.print(status_table(c.status()))
    rows = {line.split("│")[1].strip(): line for line in rec.export_text().splitlines() if "│" in line}
    assert "50%" in rows[a] and "50%" in rows[b] and "33%" not in rec.export_text()
    assert "12,345" not in rows[d]
    # the progress bar: slow workers' speeds are not rounded to "0k"
    for w in (a, b):
        c.heartbeat(Heartbeat(worker_id=w, generation=1, step=7, samples_per_s=180.0 if w == a else 90.0))
    bar = TrainingProgress(enabled=False)
    bar.update(c.status())
    assert bar.progress.tasks[0].fields["shares"] == "share@samples/s 50%@180 50%@90"


def test_machine_loses_silent_members_and_waits_for_min_workers(tmp_path):
    c, clock = _coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=5, cluster__min_workers=2,
                            cluster__wait_for_workers_s=30)
    a, b = _ready(c, 1), _ready(c, 2)
    clock.t = 4.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    c.tick()
    assert c.phase == Phase.RUNNING and c.step == 3
    clock.t = 6.0
    c.tick()                                              # b silent for 6 s: lost
    assert c.phase == Phase.REGROUPING and c.members[b].state == "lost"
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "collective_error", "generation": 0, "step": 3}))
    assert c.phase == Phase.WAITING
    assert c.plan(a).action == "checkpoint"               # keep the live state safe while waiting
    # a background checkpoint of an earlier step lands late: it is not the live state asked for
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 2, "path": "/ck2"}))
    assert c.plan(a).action == "checkpoint"
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 3, "path": "/ck3"}))
    assert c.plan(a).action == "wait"
    clock.t = 20.0
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3))
    e = _ready(c, 5)                                      # a new worker arrives in time
    assert c.phase == Phase.RUNNING and c.generation == 1
    assert c.plan(e).generation.rank == 1 and c.plan(a).generation.start_step == 3
    assert "worker_lost" in _kinds(tmp_path) and "waiting" in _kinds(tmp_path)


def test_machine_gives_up_after_the_wait_deadline(tmp_path):
    c, clock = _coordinator(tmp_path, 1, cluster__wait_for_workers_s=10, cluster__heartbeat_timeout_s=100)
    a = _ready(c, 1)
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 4, "path": "/ck"}))
    c.process_exited(1, 1)
    assert c.phase == Phase.WAITING
    clock.t = 11.0
    c.tick()
    assert c.phase == Phase.FAILED and "cluster.min_workers=1" in c.reason and "step 4" in c.reason


def test_machine_join_and_stop(tmp_path):
    c, clock = _coordinator(tmp_path, 1)
    a = _ready(c, 1)
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=2))
    b = _ready(c, 2)                                      # joins a running job: regroup
    assert c.phase == Phase.REGROUPING and c.plan(b).action == "wait"
    assert c.heartbeat(Heartbeat(worker_id=a, generation=0, step=3)).regroup_generation == 0
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 4}))
    assert c.phase == Phase.RUNNING and c.generation == 1 and len(c.generation_members) == 2
    c.request_stop("Ctrl-C")
    assert c.phase == Phase.REGROUPING
    for w in (a, b):
        c.report(Report(worker_id=w, kind="paused", payload={"reason": "regroup", "generation": 1, "step": 9}))
    assert c.plan(a).action == "checkpoint" and c.plan(b).action == "wait"
    c.report(Report(worker_id=a, kind="checkpoint", payload={"step": 9, "path": "/ck9"}))
    assert c.phase == Phase.STOPPED and c.plan(b).action == "exit"
    assert json.loads((tmp_path / "run" / "state.json").read_text())["latest_checkpoint"]["step"] == 9


def test_machine_graceful_leave(tmp_path):
    c, _ = _coordinator(tmp_path, 2)
    a, b = _ready(c, 1), _ready(c, 2)
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "leaving", "generation": 0, "step": 5}))
    assert c.members[b].state == "left" and c.phase == Phase.REGROUPING
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 5}))
    assert c.phase == Phase.RUNNING and c.generation_members == [a] and not c.incidents


def test_machine_fails_on_a_worker_error(tmp_path):
    c, _ = _coordinator(tmp_path, 1)
    a = _ready(c, 42)
    c.report(Report(worker_id=a, kind="failed", payload={"error": "ValueError: boom"}))
    assert c.phase == Phase.FAILED and "boom" in c.reason


# --- storage: checkpoints, the final model, the prepared data on resume -------------------------------
def test_a_crash_while_a_checkpoint_of_the_same_step_is_replaced_leaves_one_readable(tmp_path):
    """The same step saved twice (a periodic save, then the final one): the old folder is moved aside,
    not deleted, before the new one is renamed in. A crash in between leaves only the moved one, which
    reading the checkpoint (and --resume's check) still finds."""
    import torch
    from lepton.storage.checkpoint import read_checkpoint, readable_state_dir, write_checkpoint
    run = RunDir(tmp_path / "run")
    path = write_checkpoint(run, 40, {"w": torch.ones(3)}, keep=2)
    path.rename(path.with_name(f".{path.name}.old"))          # the state a crash after the move leaves
    assert readable_state_dir(path) is not None
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(3))
    write_checkpoint(run, 40, {"w": torch.zeros(3)}, keep=2)   # and a later save of that step replaces it
    assert torch.equal(read_checkpoint(path)["w"], torch.zeros(3))
    assert readable_state_dir(path) == path and not path.with_name(f".{path.name}.old").exists()


def test_final_model_of_a_model_with_tied_weights_is_written(tmp_path):
    import torch
    from lepton.storage.checkpoint import read_model, write_model
    emb = torch.nn.Embedding(5, 4)
    dec = torch.nn.Linear(4, 5, bias=False)
    dec.weight = emb.weight                                    # tied: one tensor under two names
    model = torch.nn.Sequential(emb, dec)
    write_model(tmp_path / "model", model.state_dict(), {"format": "test"})
    weights, _ = read_model(tmp_path / "model")
    assert torch.equal(weights["0.weight"], weights["1.weight"])


def test_resume_keeps_the_prepared_data_when_the_source_changed(tmp_path, capsys):
    """--resume continues on the data the run was prepared with (same split, same order), even when
    the source file was edited or removed since; it says so."""
    from conftest import make_classification_csv
    from lepton.launch import open_run
    data = make_classification_csv(tmp_path / "data.csv", rows=120)
    job = parse_job(job_dict(data))
    first = open_run(job, tmp_path / "run", resume=False)
    manifest = (tmp_path / "run" / "data" / "manifest.json").read_text()
    make_classification_csv(data, rows=200, seed=5)            # edited
    with pytest.raises(LeptonError, match="another lepton process is running this run"):
        open_run(None, tmp_path / "run", resume=True)          # the first still holds it
    first.release()
    again = open_run(None, tmp_path / "run", resume=True)
    again.release()
    assert again.train_rows == first.train_rows
    assert (tmp_path / "run" / "data" / "manifest.json").read_text() == manifest
    assert "resuming with the run's prepared data" in capsys.readouterr().err
    data.unlink()                                              # gone
    assert open_run(None, tmp_path / "run", resume=True).train_rows == first.train_rows


# --- metrics from exactly reduced sums -------------------------------------------------------------
@pytest.mark.parametrize("classes", [2, 4])
def test_reduced_metrics_match_sklearn_and_any_partition(classes):
    import torch
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
    from lepton import metrics
    g = torch.Generator().manual_seed(0)
    out = torch.randn(301, classes, generator=g)
    y = torch.randint(0, classes, (301,), generator=g)
    whole = metrics.finish("classification", metrics.batch_sums("classification", out, y, classes), classes, True)
    parts = sum(metrics.batch_sums("classification", out[a:b], y[a:b], classes)
                for a, b in ((0, 100), (100, 101), (101, 301)))
    split = metrics.finish("classification", parts, classes, True)
    assert split["confusion_matrix"] == whole["confusion_matrix"]
    assert split["f1"] == whole["f1"] and split["accuracy"] == whole["accuracy"]
    pred = out.argmax(1).numpy()
    assert whole["precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert whole["recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert whole["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    if classes == 2:
        exact = roc_auc_score(y, torch.softmax(out, 1)[:, 1].numpy())
        assert whole["roc_auc"] == pytest.approx(exact, abs=2e-3) and split["roc_auc"] == whole["roc_auc"]
        # a confident classifier (logit margins of tens): binning the probability put most rows in the
        # end bins, where ties read a 0.996 classifier as 0.955
        margin = 30 * torch.randn(2000, generator=g, dtype=torch.float64)
        labels = (margin + 20 * torch.randn(2000, generator=g, dtype=torch.float64) > 0).long()
        logits = torch.stack([torch.zeros_like(margin), margin], 1)
        got = metrics.finish("classification", metrics.batch_sums("classification", logits, labels, 2), 2)
        assert got["roc_auc"] == pytest.approx(roc_auc_score(labels, margin), abs=2e-3)


def test_machine_records_policy_decisions_and_best_as_events(tmp_path):
    c, _ = _coordinator(tmp_path, 1)
    a = _ready(c, 1)
    c.report(Report(worker_id=a, kind="metrics", payload={"records": [
        {"kind": "eval", "split": "val", "step": 14, "loss": 0.5},
        {"kind": "best", "step": 14, "value": 0.5, "metric": "val.loss"},
        {"kind": "decision", "decision": "lr", "step": 28, "reason": "val.loss has not improved",
         "details": {"metric": "val.loss", "lr": 0.005}},
        {"kind": "decision", "decision": "early_stop", "step": 42, "reason": "early stop", "details": {}}]}))
    ev = [e for e in c.events if e["kind"] in ("best", "lr", "early_stop")]
    assert [(e["kind"], e["step"]) for e in ev] == [("best", 14), ("lr", 28), ("early_stop", 42)]
    assert ev[1]["lr"] == 0.005 and "not improved" in ev[1]["reason"]


def test_step_meter_reports_whole_steps_over_a_full_window_only(monkeypatch):
    import lepton.worker.meter as meter_module
    from lepton.worker.meter import StepMeter
    clock = Clock()                                 # processor time, advanced by the "work" below
    monkeypatch.setattr(meter_module.time, "process_time", clock)

    def burn(s):
        clock.t += s

    m = StepMeter(on_gpu=False, window=3)
    for i in range(5):
        m.begin()
        burn(2e-3)                                  # "compute window"
        m.record(10, 2e-3, 2e-3, 0.5e-3)
        burn(1e-3)                                  # reduction, update, loop: outside the window
        if i == 1:
            burn(20e-3)                             # e.g. an evaluation: not a sample
            m.discard()
        if i == 3:
            burn(30e-3)                             # one step that paid for something else (a GC)
        if i < 3:
            assert m.fields().get("step_busy_s", 0.0) == 0.0     # no full window yet
    m.begin()
    f = m.fields()
    assert f["step_samples"] == 10 and f["step_compute_s"] == pytest.approx(2e-3)
    # the whole step (3 ms), the discarded one left out, the outlier too (a median: a mean would be 13 ms)
    assert f["step_busy_s"] == pytest.approx(3e-3)
    beat = dict(f)
    m.reset()
    beat.update(m.fields())          # heartbeat fields are merged: the last plan's medians must not stay
    assert beat["step_busy_s"] == beat["step_samples"] == beat["step_compute_s"] == 0.0
    # a shorter first window (the starting shares are a guess); after a plan switch, full windows
    m = StepMeter(on_gpu=False, window=3, first_window=2)
    for _ in range(3):
        m.begin()
        m.record(10, 1e-3, 1e-3, 0.5e-3)
    assert m.full
    m.reset()
    for _ in range(3):
        m.begin()
        m.record(10, 1e-3, 1e-3, 0.5e-3)
    assert not m.full and len(m.steps) == 2         # the third step closes at the next begin()
    m.begin()
    assert m.full



def test_a_malformed_coordinator_url_is_one_clear_error():
    from lepton.client import CoordinatorClient
    with pytest.raises(LeptonError, match="not a coordinator URL"):
        CoordinatorClient("http://127.0.0.1:70OO", "token")
    with pytest.raises(LeptonError, match="not a coordinator URL"):
        CoordinatorClient("ftp://127.0.0.1:7000", "token").status()

def test_coordinator_sockets_say_tcp_so_asyncio_disables_nagle():
    # proto 0 (socket.create_server) made uvicorn's responses wait for delayed ACKs: ~40 ms a request
    import socket
    from lepton.coordinator.server import Listener
    lis = Listener()
    try:
        assert lis.http.proto == lis.store.proto == socket.IPPROTO_TCP
    finally:
        lis.close()


@pytest.mark.parametrize("timeout_s,interval_s", [(5.0, 0.5), (2.0, 0.25)])
def test_heartbeat_interval_leaves_eight_beats_per_timeout(tmp_path, timeout_s, interval_s):
    with warnings.catch_warnings():          # starlette's note about its httpx-based test client
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    c, _ = _coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=timeout_s)
    with TestClient(build_app(c, "tok", threading.Lock(), 0, None)) as client:
        r = client.post("/v1/register", json={"host": "h", "pid": 1}, headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200 and r.json()["heartbeat_interval_s"] == interval_s


def test_keep_zeros_masks_only_trainable_weight_matrices():
    """A frozen layer has no gradient to mask (it crashed the fine-tune); biases are never masked."""
    import torch
    from torch import nn
    from lepton.model.builders import zero_masks
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        for layer in model:
            layer.weight[0, 0] = 0.0
            layer.bias.zero_()
    model[0].requires_grad_(False)
    masks = zero_masks(model)
    assert [p is model[1].weight for p, _ in masks] == [True]
    assert masks[0][1].sum() == model[1].weight.numel() - 1


def test_a_moved_run_resumes_from_its_own_checkpoints(tmp_path):
    """state.json keeps absolute checkpoint paths: a copied or moved run must resume from its own
    checkpoints/ folder, never from the original's."""
    import json
    from conftest import make_classification_csv
    from lepton.launch import open_run
    from lepton.storage.checkpoint import STATE_FILE
    data = make_classification_csv(tmp_path / "data.csv", rows=120)
    open_run(parse_job(job_dict(data)), tmp_path / "run", resume=False).release()
    original = tmp_path / "original" / "checkpoints" / "step-000000010"
    original.mkdir(parents=True)
    (original / STATE_FILE).write_bytes(b"the original run's state")
    (tmp_path / "run" / "state.json").write_text(json.dumps(
        {"status": "stopped", "latest_checkpoint": {"step": 10, "path": str(original)}}))
    with pytest.raises(LeptonError, match="missing checkpoint"):
        open_run(None, tmp_path / "run", resume=True)
    own = tmp_path / "run" / "checkpoints" / "step-000000010"
    own.mkdir(parents=True)
    (own / STATE_FILE).write_bytes(b"this run's state")
    opened = open_run(None, tmp_path / "run", resume=True)
    opened.release()
    assert opened.resume_checkpoint["path"] == str(own)
    (tmp_path / "run" / "data" / "val_x.npy").unlink()
    with pytest.raises(LeptonError, match="the prepared data is damaged"):
        open_run(None, tmp_path / "run", resume=True)
    (tmp_path / "run" / "state.json").write_text("{garbage")
    with pytest.raises(LeptonError, match="state.json: unreadable run state"):
        open_run(None, tmp_path / "run", resume=True)


def test_an_unreadable_checkpoint_is_named(tmp_path):
    from lepton.storage.checkpoint import STATE_FILE, CheckpointUnreadable, read_checkpoint
    ck = tmp_path / "step-000000004"
    ck.mkdir()
    (ck / STATE_FILE).write_bytes(b"\xb4 not a checkpoint")
    with pytest.raises(CheckpointUnreadable, match=r"step-000000004/state\.pt: unreadable checkpoint"):
        read_checkpoint(ck)
