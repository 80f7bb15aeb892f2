"""Learning-rate schedules and the divergence guard, end to end with real workers."""

import json
import math

import pytest

import lepton
from conftest import job_dict, make_classification_csv, max_rel_diff, weights
from lepton.spec import parse_job

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_classification_csv(tmp_path_factory.mktemp("pol") / "data.csv", rows=300)


def _records(run_dir, kind):
    return [
        r
        for r in (json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == kind
    ]


def test_lr_schedules():
    from lepton.worker.trainer import Trainer

    class _Cache:  # the trainer only needs the preprocessor and the train split
        def __init__(self):
            import numpy as np

            from lepton.storage.preprocess import ColumnStats, Preprocessor

            self.preprocessor = Preprocessor([ColumnStats("a", "numeric")], "y", "classification", [0, 1])
            self.x, self.y = np.zeros((100, 1), np.float32), np.zeros(100, np.int64)

        def get(self, split):
            return self.x, self.y

    def trainer(**sched):
        job = parse_job(
            job_dict(
                "d.csv",
                train__epochs=1,
                train__batch_size=10,
                train__lr_schedule=sched,
                train__optimizer={"name": "sgd", "lr": 1.0},
            )
        )
        return Trainer(job, _Cache())

    t = trainer(type="step", step_size=3, gamma=0.5)
    assert [t.lr_at(s) for s in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]
    t = trainer(type="cosine", min_lr=0.0)
    assert t.lr_at(0) == 1.0 and t.lr_at(5) == pytest.approx(0.5) and t.lr_at(10) == pytest.approx(0.0)
    t = trainer(type="constant", warmup_steps=4)
    assert [t.lr_at(s) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]


def test_scheduled_lr_is_logged_and_the_same_for_any_worker_count(data, tmp_path):
    job = job_dict(data, train__lr_schedule={"type": "cosine", "warmup_steps": 5, "min_lr": 0.0005})
    one = lepton.train(job, workers=1, run_dir=tmp_path / "one")
    three = lepton.train(job, workers=3, run_dir=tmp_path / "three")
    assert one.status == three.status == "completed"
    assert max_rel_diff(weights(three.run_dir), weights(one.run_dir)) <= 1e-4
    lrs = [r["lr"] for r in _records(three.run_dir, "train")]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0005, rel=0.05)


def test_nan_on_one_worker_is_skipped_on_all(data, tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_FAULTS", "nan:rank=1:step=4")
    res = lepton.train(job_dict(data), workers=3, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    skipped = _records(res.run_dir, "skipped_step")
    assert [r["step"] for r in skipped] == [4] and skipped[0]["lr_scale"] == 0.5
    assert res.summary["replicas_agree"] is True  # no replica applied the NaN update
    assert all(math.isfinite(v.abs().sum().item()) for v in weights(res.run_dir).values())


def test_repeated_nan_stops_with_a_clear_message(data, tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_FAULTS", "nan:rank=0")  # every step
    res = lepton.train(job_dict(data), workers=2, run_dir=tmp_path / "run")
    assert res.status == "failed"
    assert res.reason.startswith("training diverged: 3 steps in a row") and "train.optimizer.lr" in res.reason


def test_plateau_and_early_stopping_under_a_fixed_metric_sequence():
    from lepton.policies import EarlyStopping, ReduceLROnPlateau
    from lepton.spec import EarlyStoppingSpec, PlateauSpec

    plateau = ReduceLROnPlateau(
        PlateauSpec(metric="val.loss", factor=0.5, patience=1, min_lr=0.002), base_lr=0.01
    )
    early = EarlyStopping(EarlyStoppingSpec(metric="val.accuracy", mode="max", patience=2, min_delta=0.01))
    losses = [1.0, 0.8, 0.85, 0.81, 0.9, 0.95, 0.99, 1.2]
    accs = [0.5, 0.6, 0.605, 0.6, 0.58, 0.7, 0.7, 0.7]
    lr_at, stop_at = [], []
    for step, (loss, acc) in enumerate(zip(losses, accs)):
        d = plateau.observe(step, {"loss": loss})
        if d:
            lr_at.append((step, d.lr_factor))
        if early.observe(step, {"accuracy": acc}):
            stop_at.append(step)
    # best loss 0.8 at step 1; steps 2, 3 do not improve → halve at 3; 4, 5 → halve at 5; then min_lr
    assert lr_at == [(3, 0.5), (5, 0.25), (7, 0.2)]
    # best 0.6 at step 1 (0.605 is within min_delta); 2, 3, 4 stale → stop at 4
    assert stop_at[0] == 4


def test_a_non_finite_first_value_is_not_the_best():
    """NaN compares false with everything: taken as the best, nothing would ever improve on it."""
    from lepton.policies import EarlyStopping
    from lepton.spec import EarlyStoppingSpec

    early = EarlyStopping(EarlyStoppingSpec(metric="val.loss", patience=2))
    stops = [
        step for step, loss in enumerate([float("nan"), 2.0, 1.0, 0.5]) if early.observe(step, {"loss": loss})
    ]
    assert stops == []
    # never finite (e.g. r2 of a constant validation target): the policies still decide, and say why
    from lepton.policies import ReduceLROnPlateau
    from lepton.spec import PlateauSpec

    early = EarlyStopping(EarlyStoppingSpec(metric="val.r2", mode="max", patience=1))
    plateau = ReduceLROnPlateau(
        PlateauSpec(metric="val.r2", mode="max", patience=1, factor=0.5), base_lr=0.01
    )
    nan = {"r2": float("nan")}
    decisions = [(early.observe(s, nan), plateau.observe(s, nan)) for s in range(3)]
    assert "val.r2 has had no finite value for 2 evaluations" in decisions[1][0].reason
    assert decisions[1][1].lr_factor == 0.5 and "no finite value" in decisions[1][1].reason


def test_plateau_lowers_the_lr_at_the_same_step_on_any_worker_count(data, tmp_path):
    # 'max' on the validation loss: every validation after the first is "no improvement", so the
    # decision step is known in advance: the second validation (end of epoch 2, step 28)
    job = job_dict(data, train__epochs=4)
    job["policies"] = {
        "reduce_on_plateau": {"metric": "val.loss", "mode": "max", "patience": 0, "factor": 0.5}
    }
    two = lepton.train(job, workers=2, run_dir=tmp_path / "two")
    one = lepton.train(job, workers=1, run_dir=tmp_path / "one")
    assert one.status == two.status == "completed"
    decisions = _records(two.run_dir, "decision")
    assert [(d["step"], d["decision"]) for d in decisions] == [(28, "lr"), (42, "lr")]
    assert decisions[0]["lr"] == pytest.approx(0.005)
    assert max_rel_diff(weights(two.run_dir), weights(one.run_dir)) <= 1e-4
    assert two.summary["replicas_agree"] is True
    events = [json.loads(l) for l in (two.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "lr"] == [28, 42]


def test_early_stopping_stops_and_restores_the_best_model(data, tmp_path):
    from lepton.storage.checkpoint import read_checkpoint

    job = job_dict(data, train__epochs=6)
    job["policies"] = {"early_stopping": {"metric": "val.loss", "mode": "max", "patience": 1}}
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    s = res.summary
    # best at the first validation (step 14); steps 28 and 42 are stale → stop at 42
    assert s["stopped_early"] is True and s["steps"] == 42 and s["best_step"] == 14
    best = read_checkpoint(res.run_dir / "checkpoints" / "best")["model"]
    final = weights(res.run_dir)
    assert all(best[k].equal(final[k]) for k in final)
    meta = json.loads((res.run_dir / "model" / "lepton.json").read_text())
    assert meta["best_step"] == 14


def test_keep_best_weighs_the_final_model_too(data, tmp_path):
    """Validations run at epoch ends before the last step: the final weights were never a candidate,
    so a run that improved to its end was handed back the previous epoch's model."""
    job = job_dict(data, train__epochs=3)
    job["policies"] = {"keep_best": {"metric": "val.loss", "mode": "min"}}
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    best = {r["step"]: r["value"] for r in _records(res.run_dir, "best")}
    assert sorted(best) == [14, 28, 42], best  # val loss fell every epoch, the last too
    assert res.summary["best_step"] == 42 and res.summary["val"]["loss"] == pytest.approx(best[42])


def test_keep_best_never_takes_a_non_finite_value(data):
    from types import SimpleNamespace

    from lepton.policies import Tracker
    from lepton.worker.trainer import Trainer

    job = parse_job({**job_dict(data), "policies": {"keep_best": {"metric": "val.loss", "mode": "min"}}})
    t = SimpleNamespace(job=job, keep_best=Tracker("min", 0.0), step=10)
    assert not Trainer.improved(t, {"loss": float("nan")})
    t.step = 20
    assert Trainer.improved(t, {"loss": 0.5}) and (t.keep_best.best, t.keep_best.best_step) == (0.5, 20)
    t.step = 30
    assert not Trainer.improved(t, {"loss": 0.5}) and t.keep_best.best_step == 20  # equal is no better


def test_tensorboard_event_files(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = lepton.train(job_dict(data), workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed"
    acc = EventAccumulator(str(res.run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/accuracy", "val/f1", "test/accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("val/accuracy")] == [14, 28, 42]
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(res.summary["test"]["accuracy"])
