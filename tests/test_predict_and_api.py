"""Prediction from raw rows, the Python API with a factory callable, and regression end to end."""

import csv
import json
import re
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch
import yaml
from torch import nn

import lepton
from conftest import expect_cli_error, job_dict, make_classification_csv, run_cli, weights
from lepton.errors import DataError, LeptonError
from lepton.export.artifacts import ArtifactPredictor
from lepton.predict import Predictor
from lepton.storage.tables import read_table

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


# --- bad input to prediction: one clear error naming the cell, nothing written ---------------------


def _rows(data, n: int) -> list[dict]:
    rows = list(csv.DictReader(open(data)))[:n]
    for row in rows:
        del row["label"]
        for k in row:
            row[k] = float(row[k])
    return rows


def _with_cell(src, dst, row: int, column: str, value: str):
    """A copy of the CSV ``src`` with one cell replaced (``row`` counted from 0 below the header)."""
    lines = src.read_text().splitlines()
    cells = lines[row + 1].split(",")
    cells[lines[0].split(",").index(column)] = value
    lines[row + 1] = ",".join(cells)
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.mark.parametrize(
    "value, problem",
    [
        ("inf", "inf is not a finite number"),
        ("-inf", "-inf is not a finite number"),
        ("1e300", "1e+300 is out of range"),
    ],
)
def test_predict_refuses_values_the_model_cannot_take(trained, tmp_path, value, problem):
    _, data, res = trained
    bad = _with_cell(data, tmp_path / "bad.csv", 4, "f2", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy overflow warning on the way
        with pytest.raises(DataError, match=re.escape(f"bad.csv: column 'f2', row 5 (line 6): {problem}")):
            lepton.load(res.run_dir).predict_file(str(bad))


def test_predict_cli_refuses_infinity_and_writes_nothing(trained, tmp_path):
    _, data, res = trained
    bad = _with_cell(data, tmp_path / "bad.csv", 0, "f1", "inf")
    r = run_cli("predict", res.run_dir, "--input", bad, "--output", tmp_path / "o.csv", timeout=60)
    expect_cli_error(r, "column 'f1', row 1 (line 2): inf is not a finite number")
    assert not (tmp_path / "o.csv").exists()


def test_non_finite_output_names_the_row_and_column(trained, monkeypatch):
    _, data, res = trained
    p = lepton.load(res.run_dir)
    rows = _rows(data, 3)
    rows[1]["f4"] = 1e6  # finite, in float32 range once scaled, far outside the training data
    real = p.forward

    def overflowing(x):  # what the network does when such a value overflows float32 inside it
        out = real(x)
        out[np.abs(x).max(1) > 1e4] = np.nan
        return out

    monkeypatch.setattr(p, "forward", overflowing)
    with pytest.raises(
        DataError, match=r"rows\[1\]\.f4: 1000000\.0 is too far outside the training data: .*not finite"
    ):
        p.predict_rows(rows)
    with pytest.raises(LeptonError, match="output for row 1 is not finite"):
        p.predict_array(p.preprocessor.read_features(pa.Table.from_pylist(rows), "rows", False))


def test_predict_rows_names_the_bad_cell(trained):
    _, data, res = trained
    rows = _rows(data, 2)
    p = lepton.load(res.run_dir)
    for value, problem in (
        ("abc", re.escape("'abc' is not a number")),
        ([1], re.escape("'[1]' is not a number")),
        (None, "missing value"),
        (10**400, r"'1000.*\(401 characters\) is not a finite number"),
    ):
        with pytest.raises(DataError, match=r"^rows\[1\]\.f3: " + problem):
            p.predict_rows([rows[0], dict(rows[1], f3=value)])
    with pytest.raises(DataError, match=re.escape("rows[1]: expected a dict")):
        p.predict_rows([rows[0], 5])
    # a number given as text is read as in a CSV file
    assert (
        p.predict_rows([rows[0], dict(rows[1], f3=str(rows[1]["f3"]))])["prediction"]
        == p.predict_rows(rows)["prediction"]
    )


@pytest.mark.parametrize(
    "x, needle",
    [
        (np.zeros((2, 5)), "features must have shape (rows, 6), got (2, 5)"),
        (np.zeros(6), "features must have shape (rows, 6), got (6,)"),
        (np.array([["a"] * 6]), "features must be numeric"),
        (np.full((1, 6), np.nan), "row 0 has NaN or inf"),
    ],
)
def test_predict_array_checks_its_input(trained, x, needle):
    _, _, res = trained
    with pytest.raises(LeptonError, match=re.escape(needle)):
        lepton.load(res.run_dir).predict_array(x)
    # one check for the run's model and for exported artifacts
    assert ArtifactPredictor.check_features is Predictor.check_features


def test_output_path_is_checked(trained, tmp_path):
    from lepton.predict import check_output

    _, data, res = trained
    p = lepton.load(res.run_dir)
    result = p.predict_file(str(data))
    (tmp_path / "a_file").write_text("x")
    for bad, needle in (
        (tmp_path, "is a directory"),
        (tmp_path / "a_file" / "p.csv", "a_file is a file, not a directory"),
    ):
        with pytest.raises(LeptonError, match=needle):
            p.write_csv(result, str(bad))
    assert (tmp_path / "a_file").read_text() == "x"
    with pytest.raises(LeptonError, match="is the input file"):
        check_output(tmp_path / "sub" / ".." / "a_file", str(tmp_path / "a_file"))
    (tmp_path / "link.csv").symlink_to(tmp_path / "a_file")
    with pytest.raises(LeptonError, match="is the input file"):
        check_output(tmp_path / "link.csv", str(tmp_path / "a_file"))
    assert check_output(tmp_path / "new.csv", str(data)) == tmp_path / "new.csv"


def test_predict_cli_output_refusals(trained, tmp_path):
    _, data, res = trained
    rows = tmp_path / "rows.csv"
    rows.write_bytes(data.read_bytes())
    r = run_cli("predict", res.run_dir, "--input", rows, "--output", tmp_path / "." / "rows.csv", timeout=60)
    expect_cli_error(r, "--output", "is the input file")
    assert rows.read_bytes() == data.read_bytes()
    r = run_cli("predict", res.run_dir, "--input", rows, "--output", tmp_path, timeout=60)
    expect_cli_error(r, f"--output {tmp_path}: is a directory")


def test_predict_input_name_and_directory(trained, tmp_path):
    _, data, res = trained
    p = lepton.load(res.run_dir)
    (tmp_path / "rows.txt").write_bytes(data.read_bytes())
    with pytest.raises(DataError) as e:
        p.predict_file(str(tmp_path / "rows.txt"))
    assert "data.format" not in str(e.value) and "*.csv" in str(e.value) and "*.parquet" in str(e.value)
    (tmp_path / "batch").mkdir()
    with pytest.raises(DataError, match="batch: is a directory, not a data file"):
        p.predict_file(str(tmp_path / "batch"))


def test_predict_no_rows(trained, tmp_path):
    _, data, res = trained
    (tmp_path / "header.csv").write_text(data.read_text().splitlines()[0] + "\n")
    p = lepton.load(res.run_dir)
    assert len(p.predict_file(str(tmp_path / "header.csv"))["prediction"]) == 0
    assert p.predict_array(np.zeros((0, 6)))["probabilities"].shape == (0, 3)


def _damage(model_dir, how: str) -> None:
    weights = model_dir / "weights.safetensors"
    meta_path = model_dir / "lepton.json"
    meta = json.loads(meta_path.read_text())
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "empty weights":
        weights.write_bytes(b"")
    elif how == "no preprocess":
        del meta["preprocess"]
    elif how == "layer sizes":
        meta["model"]["layers"][0]["units"] += 4
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how, needle",
    [
        ("truncated weights", "weights.safetensors: cannot read the weights"),
        ("empty weights", "weights.safetensors: cannot read the weights"),
        ("no preprocess", "lepton.json: the model description lacks 'preprocess'"),
        (
            "layer sizes",
            "weights.safetensors: the weights do not fit the model described in lepton.json (size mismatch",
        ),
    ],
)
def test_damaged_model_is_one_clear_error(trained, tmp_path, how, needle):
    _, _, res = trained
    shutil.copytree(res.run_dir / "model", tmp_path / "run" / "model")
    _damage(tmp_path / "run" / "model", how)
    with pytest.raises(LeptonError, match=re.escape(needle)):
        lepton.load(tmp_path / "run")


def test_predict_cli_with_damaged_model(trained, tmp_path):
    _, data, res = trained
    shutil.copytree(res.run_dir / "model", tmp_path / "run" / "model")
    _damage(tmp_path / "run" / "model", "truncated weights")
    r = run_cli("predict", tmp_path / "run", "--input", data, "--output", tmp_path / "o.csv", timeout=60)
    expect_cli_error(r, "weights.safetensors: cannot read the weights")
    assert not (tmp_path / "o.csv").exists()


def test_python_api_with_factory_callable(tmp_path, csv_data):
    def build(input_shape, num_outputs):  # a closure: only cloudpickle can ship it
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


def test_a_new_run_from_another_runs_data_and_weights(trained, tmp_path):
    """``data_from``: the source run's prepared split, not ``data.path`` (gone here); ``model.init_weights``:
    training starts from the source's final weights (a step of lr 1e-12 leaves them where they were)."""
    root, _, ref = trained
    job = job_dict(tmp_path / "gone.csv", train__epochs=1, train__optimizer={"name": "sgd", "lr": 1e-12})
    job["model"]["init_weights"] = str(ref.run_dir / "model" / "weights.safetensors")
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run", data_from=ref.run_dir)
    assert res.status == "completed", res.reason
    for f in (ref.run_dir / "data").iterdir():
        assert (res.run_dir / "data" / f.name).read_bytes() == f.read_bytes(), f.name
    got, want = weights(res.run_dir), weights(ref.run_dir)
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    # the run keeps its own copy of the starting weights (a resume or a late worker reads it again)
    copy = res.run_dir / "init_weights.safetensors"
    assert copy.read_bytes() == (ref.run_dir / "model" / "weights.safetensors").read_bytes()
    assert yaml.safe_load((res.run_dir / "job.yaml").read_text())["model"]["init_weights"] == str(copy)
    refused = [
        (tmp_path / "run" / "model", job, "no complete prepared data"),
        (ref.run_dir, {**job, "task": "regression"}, "its prepared data has task 'classification'"),
        (ref.run_dir, {**job, "data": {**job["data"], "target": "other"}}, "data.target 'label'"),
    ]
    for source, bad, needle in refused:
        with pytest.raises(LeptonError, match=needle):
            lepton.train(bad, workers=1, run_dir=tmp_path / "never", data_from=source)
        assert not (tmp_path / "never").exists()


def test_a_run_interrupted_while_linking_another_runs_data_links_again_on_resume(trained, tmp_path):
    """A start that ended between job.yaml and the manifest link leaves part of the data: the resume
    takes it from the source run again, never from ``data.path`` (here a different file)."""
    from lepton.launch import open_run
    from lepton.spec import parse_job

    root, _, ref = trained
    other = tmp_path / "other.csv"
    make_classification_csv(other, rows=50, seed=9)
    opened = open_run(
        parse_job(job_dict(other, train__epochs=1)), tmp_path / "run", False, data_from=ref.run_dir
    )
    opened.release()
    data = opened.run.data_dir
    (data / "manifest.json").unlink()
    victim = sorted(p for p in data.iterdir() if p.is_file())[0]
    victim.unlink()  # a hard link to the source's file: never write through it
    victim.write_bytes(b"partial")
    again = open_run(None, tmp_path / "run", True)
    assert again.train_rows == opened.train_rows
    for f in (ref.run_dir / "data").iterdir():
        assert (data / f.name).read_bytes() == f.read_bytes(), f.name


def test_regression_end_to_end(tmp_path):
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.1 * g.normal(size=300)
    path = tmp_path / "reg.csv"
    path.write_text(
        "a,b,c,d,y\n" + "\n".join(",".join(f"{v:.6f}" for v in [*r, t]) for r, t in zip(x, y)) + "\n"
    )
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
    img[y == 1, :, :3, :] += 1.0  # class 1: bright upper half
    np.savez(tmp_path / "imgs.npz", x=img, y=y)
    job = job_dict(tmp_path / "imgs.npz", data__target="y", data__shape=[1, 6, 6], train__epochs=5)
    job["model"] = {
        "type": "cnn",
        "layers": [{"type": "conv", "filters": 4}, {"type": "maxpool"}, {"type": "dense", "units": 8}],
    }
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    assert res.summary["test"]["accuracy"] > 0.9
    meta = json.loads((res.run_dir / "model" / "lepton.json").read_text())
    assert meta["input_shape"] == [1, 6, 6] and meta["classes"] == [0, 1]


def test_predictions_never_overwrite_the_model(trained, tmp_path):
    from lepton.predict import check_output

    root, csv_data, ref = trained
    run = ref.run_dir
    for out, model in (
        (run / "model" / "lepton.json", run),
        (run / "model" / "new.csv", run / "model"),
        (run / "checkpoints" / "p.csv", run),
    ):
        with pytest.raises(LeptonError, match="is among the model's files"):
            check_output(out, str(csv_data), model_path=model)
    assert check_output(run / "predictions.csv", str(csv_data), model_path=run) == run / "predictions.csv"
    r = run_cli("predict", run, "--input", csv_data, "--output", run / "model" / "weights.safetensors")
    expect_cli_error(r, "is among the model's files")


def test_a_categorical_value_finds_its_category_in_any_spelling_or_type(tmp_path):
    """A prediction file's columns are typed by its own values: one whose categorical column holds only
    true/false (only digits) reads as bool (int) where the training file held other words too, and
    Parquet or Python rows carry typed values. Matched on the text alone, such rows encoded as unseen
    categories, all zeros, silently ('True' for a category 'true', 1234 for '01234')."""
    from datetime import datetime

    import pyarrow.parquet as pq

    g = np.random.default_rng(0)
    flags, codes, stamps = (
        ["true", "false", "maybe"],
        ["01234", "x7", "00042"],
        ["2024-01-01T10:00:00", "2024-02-01T10:00:00"],
    )
    lines = ["a,flag,code,b,ts,label"]
    for _ in range(240):
        f, c, b, t = g.integers(3), g.integers(3), g.integers(2), g.integers(2)
        lines.append(
            f"{g.normal():.4f},{flags[f]},{codes[c]},{['true', 'false'][b]},{stamps[t]},"
            f"{'yes' if f == 0 or c == 0 else 'no'}"
        )
    data = tmp_path / "data.csv"
    data.write_text("\n".join(lines) + "\n")
    job = job_dict(data, train__epochs=8, cluster__workers=1)
    job["data"]["categorical"] = ["b"]  # typed bool in training: categories 'False', 'True'
    res = lepton.train(job, workers=1, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    predictor = lepton.load(res.run_dir)
    pre = predictor.preprocessor
    assert {c.name: c.categories for c in pre.columns if c.kind == "categorical"} == {
        "flag": ["false", "maybe", "true"],
        "code": ["00042", "01234", "x7"],
        "b": ["False", "True"],
        "ts": ["2024-01-01 10:00:00", "2024-02-01 10:00:00"],
    }

    mixed, narrow = tmp_path / "mixed.csv", tmp_path / "narrow.csv"
    rows = "0.1,true,01234,true,2024-01-01T10:00:00\n0.2,false,00042,false,2024-02-01T10:00:00\n"
    mixed.write_text("a,flag,code,b,ts\n" + rows + "0.3,maybe,x7,true,2024-01-01T10:00:00\n")
    narrow.write_text("a,flag,code,b,ts\n" + rows)  # here flag and b read as bool, code as int
    pq.write_table(pacsv.read_csv(narrow), tmp_path / "narrow.parquet")

    def filled(x) -> bool:  # every categorical block of every row holds its one 1
        return all(
            (x[:, j : j + c.width].sum(1) == 1).all()
            for c, j in zip(pre.columns, pre.offsets)
            if c.kind == "categorical"
        )

    assert filled(pre.read_features(pacsv.read_csv(narrow), "narrow", True))
    want = predictor.predict_file(str(mixed))["probabilities"][:2]
    for source in (narrow, tmp_path / "narrow.parquet"):
        np.testing.assert_array_equal(predictor.predict_file(str(source))["probabilities"], want)
    typed = [
        {"a": 0.1, "flag": True, "code": 1234, "b": True, "ts": datetime(2024, 1, 1, 10)},
        {"a": 0.2, "flag": False, "code": 42, "b": False, "ts": datetime(2024, 2, 1, 10)},
    ]
    np.testing.assert_array_equal(predictor.predict_rows(typed)["probabilities"], want)
    assert predictor.predict_file(str(narrow))["prediction"] == ["yes", "no"]
    # lepton serve's JSON rows: booleans and numbers for categorical columns, as parsed from the body
    from lepton.export.serve import parse_body, predict_response, rows_to_table

    body = json.dumps(
        {"rows": [{"a": 0.1, "flag": True, "code": 1234, "b": "TRUE", "ts": "2024-01-01 10:00:00"}]}
    )
    answer = predict_response(predictor, rows_to_table(parse_body(body.encode()), predictor))
    np.testing.assert_allclose(answer["probabilities"][0], want[0], rtol=1e-6)


def test_a_float32_value_finds_its_decimal_category():
    """A Parquet float32 0.1 read through Python floats is 0.10000000149011612, which matched no
    category '0.1' (the row encoded as unseen, all zeros); float16 likewise."""
    from lepton.storage.preprocess import ColumnStats, Preprocessor

    pre = Preprocessor(
        [ColumnStats("rate", "categorical", categories=["0.1", "2.5", "3", "high"])],
        "y",
        "classification",
        ["n", "y"],
    )
    for dtype in (pa.float32(), pa.float16(), pa.float64()):
        table = pa.table({"rate": pa.array([0.1, 2.5, 3.0], dtype)})
        np.testing.assert_array_equal(pre.read_features(table, "t.parquet", False), np.eye(4)[:3])
    # a model trained before holds the float64 widening as its category: its own data still finds it
    older = Preprocessor(
        [ColumnStats("rate", "categorical", categories=["0.10000000149011612", "2.5"])],
        "y",
        "classification",
        ["n", "y"],
    )
    table = pa.table({"rate": pa.array([0.1, 2.5], pa.float32())})
    np.testing.assert_array_equal(older.read_features(table, "t.parquet", False), np.eye(2))


def test_twenty_digit_ids_stay_distinct_categories(tmp_path):
    """pyarrow types a CSV column of 20-digit numbers (hashed uint64 IDs) float64, which keeps 17
    digits: IDs that differ in the last ones became one category in training and prediction."""
    ids = ["12345678901234567890", "12345678901234567891", "12345678901234567892"]
    data = tmp_path / "d.csv"
    data.write_text(
        "a,user,label\n" + "".join(f"{i / 10},{ids[i % 3]},{'xy'[i % 3 == 1]}\n" for i in range(60))
    )
    job = job_dict(data, train__epochs=2, cluster__workers=1)
    job["data"]["categorical"] = ["user"]
    res = lepton.train(job, workers=1, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    predictor = lepton.load(res.run_dir)
    pre = predictor.preprocessor
    user = next(c for c in pre.columns if c.name == "user")
    assert user.categories == ids
    only = tmp_path / "only-ids.csv"  # typed float64 here too: every value is digits
    only.write_text("a,user\n0.5," + "\n0.5,".join(ids) + "\n")
    table = read_table(str(only), categorical=["user"])
    assert table.column("user").to_pylist() == ids
    np.testing.assert_array_equal(pre.read_features(table, "only-ids.csv", True)[:, 1:], np.eye(3))
    # the header checks come first: a repeated or non-UTF-8 name is one clear error, not a KeyError
    for header in (b"a,user,user\n", b"a,us\xe9r,b\n"):
        bad = tmp_path / "bad.csv"
        bad.write_bytes(header + b"0.5,12345678901234567890,1\n")
        with pytest.raises(DataError, match="duplicate column name|not UTF-8"):
            read_table(str(bad), categorical=["user"])
    # where float64 keeps every value, pyarrow's reading stays: 2 and 2.0 are one category
    rates = tmp_path / "rates.csv"
    rates.write_text("rate\n1.5\n2\n2.0\n")
    assert read_table(str(rates), categorical=["rate"]).column("rate").to_pylist() == [1.5, 2.0, 2.0]
    typed = predictor.predict_rows([{"a": 0.5, "user": int(i)} for i in ids])["probabilities"]
    np.testing.assert_array_equal(predictor.predict_file(str(only))["probabilities"], typed)
    assert len({tuple(p) for p in typed}) == 3


def test_two_spellings_of_one_number_stay_two_categories_in_prediction(tmp_path):
    """Training read the column as text (it holds a word), so '01234' and '1234' are two categories; a
    prediction CSV of only digits types the column int, and the row 01234 was encoded as '1234'."""
    codes = ["01234", "1234", "x7"]
    data = tmp_path / "d.csv"
    data.write_text(
        "a,code,label\n" + "".join(f"{i / 10},{codes[i % 3]},{'xy'[i % 3 == 1]}\n" for i in range(60))
    )
    res = lepton.train(
        job_dict(data, train__epochs=2, cluster__workers=1), workers=1, run_dir=tmp_path / "run"
    )
    assert res.status == "completed", res.reason
    predictor = lepton.load(res.run_dir)
    code = next(c for c in predictor.preprocessor.columns if c.name == "code")
    assert code.categories == codes and code.spellings_collide
    digits = tmp_path / "digits.csv"
    digits.write_text("a,code\n0.5,01234\n0.5,1234\n")
    typed = predictor.predict_rows([{"a": 0.5, "code": "01234"}, {"a": 0.5, "code": "1234"}])["probabilities"]
    got = predictor.predict_file(str(digits))["probabilities"]
    np.testing.assert_array_equal(got, typed)
    assert not np.array_equal(got[0], got[1])
    from lepton.storage.preprocess import ColumnStats

    assert not ColumnStats("code", "categorical", categories=["1234", "x7"]).spellings_collide


def test_nanosecond_timestamps_are_categories_not_a_traceback(tmp_path):
    """pyarrow types a column of nanosecond timestamps timestamp[ns], which has no Python datetime
    without pandas: typing and encoding it used to end in a ValueError traceback."""
    data = tmp_path / "d.csv"
    stamps = ["2024-01-01T10:00:00.123456789", "2024-01-02T10:00:00.123456789"]
    data.write_text("a,ts,label\n" + "".join(f"{i / 10},{stamps[i % 2]},{'xy'[i % 2]}\n" for i in range(40)))
    res = lepton.train(
        job_dict(data, train__epochs=2, cluster__workers=1), workers=1, run_dir=tmp_path / "run"
    )
    assert res.status == "completed", res.reason
    predictor = lepton.load(res.run_dir)
    ts = next(c for c in predictor.preprocessor.columns if c.name == "ts")
    assert ts.kind == "categorical" and ts.categories == [s.replace("T", " ") for s in stamps]
    assert len(predictor.predict_file(str(data))["prediction"]) == 40
