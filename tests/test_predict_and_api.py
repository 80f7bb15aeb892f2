"""Prediction from raw rows, the Python API with a factory callable, and regression end to end."""
import csv
import json

import numpy as np
import pytest
import pyarrow.csv as pacsv
import torch
from torch import nn

import lepton
from conftest import job_dict, make_classification_csv, run_cli, weights

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    data = make_classification_csv(root / "data.csv", rows=300)
    res = lepton.train(job_dict(data, train__epochs=6), workers=2, run_dir=root / "run")
    assert res.status == "completed", res.reason
    return root, data, res


def test_predict_cli_matches_python_api(trained, tmp_path):
    root, data, res = trained
    out = tmp_path / "preds.csv"
    r = run_cli("predict", res.run_dir, "--input", data, "--output", out)
    assert r.returncode == 0, r.stderr
    table = pacsv.read_csv(out)
    assert table.column_names == ["prediction", "prob_c0", "prob_c1", "prob_c2"]
    probs = np.stack([table.column(c).to_numpy() for c in table.column_names[1:]], 1)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    predictor = lepton.load(res.run_dir)
    direct = predictor.predict_file(str(data))
    assert table.column("prediction").to_pylist() == direct["prediction"]
    # raw rows in, the run's preprocessing applied: accuracy over the whole file is high on this easy set
    labels = [row["label"] for row in csv.DictReader(open(data))]
    acc = np.mean([p == y for p, y in zip(direct["prediction"], labels)])
    assert acc > 0.85


def test_predict_rows_from_dicts(trained):
    _, data, res = trained
    rows = list(csv.DictReader(open(data)))[:5]
    for row in rows:
        del row["label"]
        for k in row:
            row[k] = float(row[k])
    out = lepton.load(res.run_dir).predict_rows(rows)
    assert len(out["prediction"]) == 5 and out["probabilities"].shape == (5, 3)


def test_predict_missing_feature_column(trained, tmp_path):
    _, data, res = trained
    lines = data.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(",".join(l.split(",")[1:]) for l in lines) + "\n")
    r = run_cli("predict", res.run_dir, "--input", bad, "--output", tmp_path / "o.csv")
    assert r.returncode == 2 and "missing feature column(s) 'f0'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.csv").exists()


def test_predict_without_model(tmp_path):
    r = run_cli("predict", tmp_path, "--input", "x.csv", "--output", tmp_path / "o.csv")
    assert r.returncode == 2 and "no trained model" in r.stderr


def test_python_api_with_factory_callable(tmp_path, csv_data):
    def build(input_shape, num_outputs):          # a closure: only cloudpickle can ship it
        hidden = 12
        return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))

    job = job_dict(csv_data)
    job["model"] = {"type": "factory", "factory": build}
    res = lepton.train(job, workers=2, run_dir=tmp_path / "a")
    assert res.status == "completed", res.reason
    # the same architecture from an importable "module:function" gives the same model
    job["model"] = {"type": "factory", "factory": "factory_models:build"}
    res2 = lepton.train(job, workers=1, run_dir=tmp_path / "b")
    assert res2.status == "completed", res2.reason
    a, b = weights(res.run_dir), weights(res2.run_dir)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    p = lepton.load(res.run_dir)
    assert len(p.predict_file(str(csv_data))["prediction"]) == 240


def test_regression_end_to_end(tmp_path):
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.1 * g.normal(size=300)
    path = tmp_path / "reg.csv"
    path.write_text("a,b,c,d,y\n" + "\n".join(",".join(f"{v:.6f}" for v in [*r, t]) for r, t in zip(x, y)) + "\n")
    job = job_dict(path, task="regression", data__target="y", train__epochs=20)
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    test = res.summary["test"]
    assert {"mse", "mae", "r2"} <= test.keys() and test["r2"] > 0.9
    pred = lepton.load(res.run_dir).predict_file(str(path))["prediction"]
    assert np.corrcoef(pred, y)[0, 1] > 0.95


def test_cnn_on_images(tmp_path):
    g = np.random.default_rng(0)
    n = 200
    y = g.integers(0, 2, n)
    img = g.normal(scale=0.3, size=(n, 1, 6, 6))
    img[y == 1, :, :3, :] += 1.0                     # class 1: bright upper half
    np.savez(tmp_path / "imgs.npz", x=img, y=y)
    job = job_dict(tmp_path / "imgs.npz", data__target="y", data__shape=[1, 6, 6], train__epochs=5)
    job["model"] = {"type": "cnn", "layers": [{"type": "conv", "filters": 4}, {"type": "maxpool"},
                                              {"type": "dense", "units": 8}]}
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    assert res.summary["test"]["accuracy"] > 0.9
    meta = json.loads((res.run_dir / "model" / "lepton.json").read_text())
    assert meta["input_shape"] == [1, 6, 6] and meta["classes"] == [0, 1]
