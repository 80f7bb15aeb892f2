"""Unit level: the sampler, the spec, preprocessing, and the coordinator stepped against fake workers."""
import json

import numpy as np
import pytest

from lepton.coordinator.machine import Coordinator, Phase
from lepton.errors import DataError, SpecError
from lepton.protocol import Heartbeat, RegisterRequest, Report
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


def test_machine_forms_generation_and_completes(tmp_path):
    c, clock = _coordinator(tmp_path, 2, cluster__shares=[1, 3])
    a = c.register(RegisterRequest(host="h", pid=1))
    assert c.phase == Phase.WAITING and c.plan(a).action == "wait"
    b = c.register(RegisterRequest(host="h", pid=2))
    assert c.phase == Phase.RUNNING
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


def test_machine_fails_on_heartbeat_timeout(tmp_path):
    c, clock = _coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=5)
    a = c.register(RegisterRequest(host="h", pid=1))
    b = c.register(RegisterRequest(host="h", pid=2))
    clock.t = 4.0
    c.heartbeat(Heartbeat(worker_id=a, step=3))
    c.tick()
    assert c.phase == Phase.RUNNING and c.step == 3
    clock.t = 6.0
    c.tick()
    assert c.phase == Phase.FAILED and b in c.reason and "no heartbeat" in c.reason
    kinds = [json.loads(l)["kind"] for l in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert kinds[-1] == "failed"


def test_machine_fails_when_a_local_worker_exits(tmp_path):
    c, _ = _coordinator(tmp_path, 1)
    c.register(RegisterRequest(host="h", pid=42))
    c.process_exited(42, -9)
    assert c.phase == Phase.FAILED and "exited with code -9" in c.reason
