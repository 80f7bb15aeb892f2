"""Dropout keyed by sample (lepton/worker/dropout.py): a sample's mask does not depend on the rank,
the neighbours or the micro-batch that computes it, so a model with dropout trained by 1 worker or by 3
with unequal shares and micro-batches ends the same (invariant 1; torch's dropout gave a relative
difference of 0.68)."""

import numpy as np
import pytest
import torch
from torch import nn

import lepton
from conftest import job_dict, make_classification_csv, max_rel_diff, weights
from lepton.model import dropout

pytestmark = pytest.mark.timeout(240)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Dropout1d(0.5), nn.Flatten(), nn.Dropout(0.25))
    assert dropout.convert(m) == 2 and all(isinstance(m[i], dropout.KeyedDropout) for i in (1, 3))
    return m


def test_a_samples_mask_is_the_same_however_the_batch_is_split():
    m, x = _model(), torch.randn(10, 2, 5)
    rows = np.array([41, 7, 3, 99, 12, 5, 60, 8, 2, 77])
    with dropout.keyed(seed=3, step=11, rows=rows):
        whole = m(x)
    parts = []
    for lo, hi in ((0, 1), (1, 4), (4, 10)):  # three ranks, or three micro-batches
        with dropout.keyed(seed=3, step=11, rows=rows[lo:hi]):
            parts.append(m(x[lo:hi]))
    same(torch.cat(parts), whole)
    order = np.random.default_rng(0).permutation(10)  # other neighbours, other order
    with dropout.keyed(seed=3, step=11, rows=rows[order]):
        same(m(x[order]), whole[order])
    with dropout.keyed(seed=3, step=12, rows=rows):  # the next step draws new masks
        assert not torch.equal(m(x) == 0, whole == 0)


def same(a, b):
    """The same masks (zeros) and values (the convolution may round differently for another batch size)."""
    assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, atol=1e-6)


def test_masks_drop_at_the_rate_and_scale_as_torch():
    keep = dropout.keep_mask(torch.arange(1000), 400, dropout._key(0, 1), 0.3)
    assert keep.shape == (1000, 400) and abs(float(keep.float().mean()) - 0.7) < 0.005
    # neither rows nor columns are correlated: each row's and each column's rate is near 0.7 too
    assert float((keep.float().mean(1) - 0.7).abs().max()) < 0.12
    assert float((keep.float().mean(0) - 0.7).abs().max()) < 0.08
    assert torch.equal(keep[17:18], dropout.keep_mask(torch.tensor([17]), 400, dropout._key(0, 1), 0.3))
    assert not torch.equal(keep, dropout.keep_mask(torch.arange(1000), 400, dropout._key(0, 2), 0.3))
    m = dropout.KeyedDropout(0.3)
    x = torch.ones(1000, 400)
    with dropout.keyed(seed=0, step=0, rows=np.arange(1000)):
        y = m(x)
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))
    # channel dropout: a whole (sample, channel) row is kept or dropped
    m = _model()[1]
    with dropout.keyed(seed=0, step=0, rows=np.arange(200)):
        y = m(torch.ones(200, 4, 6))
    assert torch.equal(y.amin(dim=2), y.amax(dim=2)) and 0.4 < float((y[:, :, 0] == 0).float().mean()) < 0.6
    # outside a keyed pass it is torch's dropout (torch's generator); in evaluation, the identity
    torch.manual_seed(5)
    ref = nn.functional.dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(dropout.KeyedDropout(0.3)(x), ref)
    assert torch.equal(dropout.KeyedDropout(0.3).eval()(x), x)
    assert list(_model().state_dict()) == ["0.weight", "0.bias"]  # checkpoints unchanged


class _Block(nn.Module):
    """Two dropout calls — by two layers, or by one layer twice — inside a block that activation
    checkpointing recomputes in the backward."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(6, 6), nn.Linear(6, 6), nn.Dropout(0.5)
        self.drop2 = self.drop if reuse else nn.Dropout(0.5)

    def forward(self, x):
        return self.drop2(self.b(self.drop(torch.tanh(self.a(x)))))


def _block_model(checkpointed: bool, reuse: bool = False):
    torch.manual_seed(0)
    block, head = _Block(reuse), nn.Linear(6, 1)
    assert dropout.convert(block) == (1 if reuse else 2) and (block.drop is block.drop2) == reuse

    def forward(x):
        h = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        return head(h).sum()

    return [*block.parameters(), *head.parameters()], forward


def test_a_checkpoint_recompute_draws_the_forwards_masks():
    x, rows = torch.randn(8, 6), np.arange(8) * 3
    grads = []
    for checkpointed in (False, True):
        params, forward = _block_model(checkpointed)
        with dropout.keyed(seed=1, step=4, rows=rows):
            forward(x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6), "the recompute applied other masks"
    # a layer called twice in the forward: which call a recompute repeats is unknown, so it is refused
    params, forward = _block_model(checkpointed=True, reuse=True)
    with pytest.raises(RuntimeError, match="called 2 times in one forward pass is recomputed"):
        with dropout.keyed(seed=1, step=4, rows=rows):
            forward(x).backward()


class _SequenceFirst(nn.Module):
    """Dropout on a (time, batch, features) tensor: its first dimension is not the sample count."""

    def __init__(self):
        super().__init__()
        self.drop, self.head = nn.Dropout(0.2), nn.Linear(4, 2)

    def forward(self, x):  # x: (batch, time, features)
        return self.head(self.drop(x.transpose(0, 1)).mean(0))


def test_layers_left_to_torchs_random_numbers_are_named():
    class MyDropout(nn.Dropout):  # a subclass may do more than drop: not converted
        pass

    model = nn.Sequential(
        nn.Linear(4, 4),
        MyDropout(0.1),
        nn.AlphaDropout(0.1),
        nn.LSTM(4, 4, 2, dropout=0.3),
        nn.MultiheadAttention(4, 2, dropout=0.1),
        nn.MultiheadAttention(4, 2),
    )
    assert dropout.convert(model) == 0
    assert dropout.unkeyed(model) == [
        "AlphaDropout",
        "LSTM(dropout=0.3)",
        "MultiheadAttention(dropout=0.1)",
        "MyDropout",
    ]
    seq = _SequenceFirst()
    assert dropout.convert(seq) == 1 and seq.training
    assert dropout.batch_first(seq.eval(), (5, 4)) == ["Dropout #0"] and not seq.training
    batch = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))
    dropout.convert(batch)
    assert dropout.batch_first(batch, (4,)) == []


def test_a_model_with_dropout_is_the_same_for_any_worker_count_and_micro_batches(tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    runs = {}
    for label, workers, shares, micro, build in (
        ("1", 1, None, None, "build_dropout"),
        ("3-unequal-micro", 3, [1, 2, 5], 3, "build_dropout"),
        ("checkpointed", 2, [2, 1], None, "build_dropout_checkpointed"),
    ):
        job = job_dict(data, model={"type": "factory", "factory": f"factory_models:{build}"})
        job["cluster"].update(shares=shares, max_micro_batch=micro)
        res = lepton.train(job, workers=workers, run_dir=tmp_path / f"run-{label}")
        assert res.status == "completed", res.reason
        runs[label] = res
    diff = max_rel_diff(weights(runs["3-unequal-micro"].run_dir), weights(runs["1"].run_dir))
    assert diff <= 1e-4, f"3 workers with unequal shares and micro-batches differ from 1 by {diff:.2e}"
    diff = max_rel_diff(weights(runs["checkpointed"].run_dir), weights(runs["1"].run_dir))
    assert diff <= 1e-4, f"activation checkpointing changed the model by {diff:.2e}"


def test_random_layers_it_cannot_key_are_named_at_launch(tmp_path, capsys):
    data = make_classification_csv(tmp_path / "data.csv", rows=100)
    job = job_dict(
        data, model={"type": "factory", "factory": "factory_models:build_alpha_dropout"}, train__epochs=1
    )
    assert lepton.train(job, workers=1, run_dir=tmp_path / "run").status == "completed"
    err = capsys.readouterr().err
    assert (
        "note: these random layers of the model draw torch's random numbers" in err and "AlphaDropout" in err
    )
    job["model"]["factory"] = "factory_models:build_dropout"
    assert lepton.train(job, workers=1, run_dir=tmp_path / "keyed").status == "completed"
    assert "note:" not in capsys.readouterr().err


def test_dense_layers_take_a_dropout_rate_as_keras_does(tmp_path):
    from lepton.model.builders import build_model
    from lepton.spec import parse_job

    job = job_dict(tmp_path / "data.csv")
    job["model"]["layers"] = [{"units": 8, "dropout": 0.25}, {"units": 8}]
    model = build_model(parse_job(job), (5,), 3)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert model[2].p == 0.25
    job["model"] = {
        "type": "cnn",
        "layers": [{"type": "conv", "filters": 2}, {"type": "dense", "units": 4, "dropout": 0.5}],
    }
    job["data"]["shape"] = [1, 4, 4]
    assert "Dropout" in [type(m).__name__ for m in build_model(parse_job(job), (1, 4, 4), 3)]
    # without a rate no layer is added: the weights' names stay those of earlier runs
    job["model"], job["data"]["shape"] = {"type": "mlp", "layers": [{"units": 8}]}, None
    assert list(build_model(parse_job(job), (5,), 3).state_dict()) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
