"""Dropout keyed by sample (lepton/worker/dropout.py): a sample's mask does not depend on the rank,
the neighbours or the micro-batch that computes it, so a model with dropout trained by 1 worker or by 3
with unequal shares and micro-batches ends the same (invariant 1; torch's dropout gave a relative
difference of 0.3)."""
import numpy as np
import pytest
import torch
from torch import nn

import lepton
from conftest import job_dict, make_classification_csv, max_rel_diff, weights
from lepton.worker import dropout

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
    for lo, hi in ((0, 1), (1, 4), (4, 10)):                  # three ranks, or three micro-batches
        with dropout.keyed(seed=3, step=11, rows=rows[lo:hi]):
            parts.append(m(x[lo:hi]))
    same(torch.cat(parts), whole)
    order = np.random.default_rng(0).permutation(10)          # other neighbours, other order
    with dropout.keyed(seed=3, step=11, rows=rows[order]):
        same(m(x[order]), whole[order])
    with dropout.keyed(seed=3, step=12, rows=rows):           # the next step draws new masks
        assert not torch.equal(m(x) == 0, whole == 0)


def same(a, b):
    """The same masks (zeros) and values (the convolution may round differently for another batch size)."""
    assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, atol=1e-6)


def test_masks_drop_at_the_rate_and_scale_as_torch():
    u = dropout.uniform(np.arange(1000), 400, dropout._key(0, 1))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005
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
    assert torch.equal(y.amin(dim=2), y.amax(dim=2))
    # outside a keyed pass it is torch's dropout (torch's generator); in evaluation, the identity
    torch.manual_seed(5)
    ref = nn.functional.dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(dropout.KeyedDropout(0.3)(x), ref)
    assert torch.equal(dropout.KeyedDropout(0.3).eval()(x), x)
    assert list(_model().state_dict()) == ["0.weight", "0.bias"]          # checkpoints unchanged


def test_a_model_with_dropout_is_the_same_for_any_worker_count_and_micro_batches(tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    runs = {}
    for label, workers, shares, micro in (("1", 1, None, None), ("3-unequal-micro", 3, [1, 2, 5], 3)):
        job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_dropout"})
        job["cluster"].update(shares=shares, max_micro_batch=micro)
        res = lepton.train(job, workers=workers, run_dir=tmp_path / f"run-{label}")
        assert res.status == "completed", res.reason
        runs[label] = res
    diff = max_rel_diff(weights(runs["3-unequal-micro"].run_dir), weights(runs["1"].run_dir))
    assert diff <= 1e-4, f"3 workers with unequal shares and micro-batches differ from 1 by {diff:.2e}"


def test_random_layers_it_cannot_key_are_named_at_launch(tmp_path, capsys):
    data = make_classification_csv(tmp_path / "data.csv", rows=100)
    job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_alpha_dropout"},
                   train__epochs=1)
    assert lepton.train(job, workers=1, run_dir=tmp_path / "run").status == "completed"
    err = capsys.readouterr().err
    assert "note: the model's AlphaDropout draws torch's random numbers" in err
    job["model"]["factory"] = "factory_models:build_dropout"
    assert lepton.train(job, workers=1, run_dir=tmp_path / "keyed").status == "completed"
    assert "note:" not in capsys.readouterr().err
