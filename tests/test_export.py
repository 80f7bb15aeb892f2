"""The export phase: ONNX/TorchScript/safetensors artifacts, int8/fp16/bf16, pruning, loading artifacts
for prediction, bad artifacts and bad input, and `lepton serve`.

Two runs are trained once per module (the bundled breast-cancer MLP and digits CNN, with fewer epochs)
and exported a few times; every test reads those artifacts. No test asserts a timing.
"""

import csv
import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
import yaml
from safetensors.torch import load_file

import lepton
from conftest import REPO, expect_cli_error, first_line, job_dict, make_classification_csv, run_cli
from lepton.errors import DataError, LeptonError, SpecError
from lepton.export import ExportSpec, run_export
from lepton.export.artifacts import ArtifactPredictor, load_artifact

pytestmark = pytest.mark.timeout(300)

BREAST = REPO / "examples" / "breast_cancer_mlp.yaml"
BREAST_CSV = REPO / "examples" / "data" / "breast_cancer.csv"
DIGITS = REPO / "examples" / "digits_cnn.yaml"
RUNS = 10  # timed calls per batch size: the report's shape is tested, never its timings


def _train(yaml_path: Path, run_dir: Path, epochs: int) -> Path:
    res = lepton.train(str(yaml_path), workers=1, run_dir=run_dir, overrides=[f"train.epochs={epochs}"])
    assert res.status == "completed", res.reason
    return res.run_dir


@pytest.fixture(scope="module")
def breast(tmp_path_factory):
    """The breast-cancer run, exported as fp32 in every format, as int8 ONNX, and as fp16/bf16."""
    run = _train(BREAST, tmp_path_factory.mktemp("breast") / "run", epochs=12)
    reports = {
        "fp32": run_export(run, {"format": ["onnx", "torchscript", "safetensors"], "latency_runs": RUNS}),
        "int8": run_export(run, {"format": "onnx", "quantize": "int8", "latency_runs": RUNS}),
        "fp16": run_export(
            run, {"format": ["onnx", "safetensors", "torchscript"], "quantize": "fp16", "latency_runs": 0}
        ),
        "bf16": run_export(run, {"format": ["onnx", "safetensors"], "quantize": "bf16", "latency_runs": 0}),
    }
    return run, reports


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    run = _train(DIGITS, tmp_path_factory.mktemp("digits") / "run", epochs=4)
    return run, run_export(run, {"format": "onnx", "quantize": "int8", "latency_runs": RUNS})


def _row(report: dict, name: str) -> dict:
    return next(r for r in report["rows"] if r["name"] == name)


def _test_split(run: Path):
    return np.load(run / "data" / "test_x.npy"), np.load(run / "data" / "test_y.npy")


# --- ONNX and int8 ---------------------------------------------------------------------------------


@pytest.mark.e2e  # its fixture, looked up by name, trains a run
@pytest.mark.parametrize("which", ["breast", "digits"])
def test_fp32_onnx_matches_torch(which, request):
    run = request.getfixturevalue(which)[0]
    x, _ = _test_split(run)
    torch_out = lepton.load(run).model(torch.from_numpy(x)).detach().numpy()
    onnx_out = load_artifact(run / "exports" / "model.onnx").runner(x)
    assert onnx_out.shape == torch_out.shape
    assert np.abs(onnx_out - torch_out).max() <= 1e-5
    # the batch axis is dynamic: one row and many rows both run
    assert load_artifact(run / "exports" / "model.onnx").runner(x[:1]).shape == (1, torch_out.shape[1])


@pytest.mark.e2e  # its fixture, looked up by name, trains a run
@pytest.mark.parametrize("which", ["breast", "digits"])
def test_int8_accuracy_within_one_point(which, request):
    run, report = request.getfixturevalue(which)
    if which == "breast":
        report = report["int8"]
    fp32, int8 = report["rows"][0], _row(report, "model.int8.onnx")
    assert int8["metrics"]["accuracy"] >= fp32["metrics"]["accuracy"] - 0.01, (
        fp32["metrics"],
        int8["metrics"],
    )
    # the report's number is what a user gets from the artifact
    x, y = _test_split(run)
    pred = load_artifact(run / "exports" / "model.int8.onnx").runner(x).argmax(1)
    assert abs((pred == y).mean() - int8["metrics"]["accuracy"]) < 1e-9
    assert int8["size_bytes"] < _row(report, "model.onnx")["size_bytes"]


def test_int8_method_static_for_convolutions(digits, breast, tmp_path):
    """auto: a convolutional model is quantized statically (QLinearConv, scales calibrated on training
    rows), an MLP dynamically; dynamic convolutions are ConvInteger; static needs training rows."""
    import onnx

    run, report = digits
    q = onnx.load(str(run / "exports" / "model.int8.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert "QLinearConv" in ops and "ConvInteger" not in ops, ops
    assert any("static quantization" in n and "512 training rows" in n for n in report["notes"]), report[
        "notes"
    ]
    for name in ("model.onnx", "model.int8.onnx"):  # the exporter's debugging metadata is not shipped
        assert not onnx.load(str(run / "exports" / name)).graph.metadata_props
    # the exports below replace model.int8.onnx: on copies, so the module's runs keep the fixtures' files
    run = shutil.copytree(run, tmp_path / "digits")
    dyn = run_export(run, {"format": "onnx", "quantize": "int8", "int8_method": "dynamic", "latency_runs": 0})
    assert "ConvInteger" in {
        n.op_type for n in onnx.load(str(run / "exports" / "model.int8.onnx")).graph.node
    }
    assert any("dynamic quantization" in n for n in dyn["notes"]) and any(
        "ConvInteger" in n for n in dyn["notes"]
    )
    fp32 = dyn["rows"][0]["metrics"]["accuracy"]
    assert _row(dyn, "model.int8.onnx")["metrics"]["accuracy"] >= fp32 - 0.01
    # an MLP can be quantized statically too; without training rows static is a clear error
    brun = shutil.copytree(breast[0], tmp_path / "breast")
    st = run_export(brun, {"format": "onnx", "quantize": "int8", "int8_method": "static", "latency_runs": 0})
    assert _row(st, "model.int8.onnx")["metrics"]["accuracy"] >= st["rows"][0]["metrics"]["accuracy"] - 0.01
    bare = tmp_path / "bare"
    shutil.copytree(brun, bare, ignore=shutil.ignore_patterns("train_x.npy", "exports"))
    with pytest.raises(LeptonError, match="train_x.npy.*no(ne| prepared)") as err:
        run_export(bare, {"format": "onnx", "quantize": "int8", "int8_method": "static", "latency_runs": 0})
    assert "--int8-method dynamic" in str(err.value)  # the way out, for the CLI user too
    assert not (bare / "exports").exists()  # checked before any work


def test_int8_method_auto_choice():
    from onnx import helper

    from lepton.export.onnx_format import int8_method

    def graph(op):
        return helper.make_model(helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "g", [], []))

    conv, mlp = graph("Conv"), graph("Gemm")
    assert int8_method(conv, "auto", 512, "classification") == "static"
    assert int8_method(conv, "auto", 512, "regression") == "dynamic"  # would clip its output
    assert int8_method(conv, "auto", 0, "classification") == "dynamic"  # nothing to calibrate on
    assert int8_method(mlp, "auto", 512, "classification") == "dynamic"
    assert int8_method(mlp, "static", 512, "regression") == "static"  # asked for


def test_report_contents(breast):
    run, reports = breast
    saved = json.loads((run / "exports" / "report.json").read_text())
    assert saved["spec"]["quantize"] == "bf16" and saved == json.loads(
        json.dumps(reports["bf16"])
    )  # the last export's
    rep = reports["int8"]
    assert rep["task"] == "classification" and rep["test_rows"] == len(_test_split(run)[1])
    assert [r["name"] for r in rep["rows"]][1:] == ["model.onnx", "model.int8.onnx"]
    for row in rep["rows"]:
        assert row["size_bytes"] > 0 and 0 <= row["metrics"]["accuracy"] <= 1
        for b in ("batch_1", "batch_64"):
            lat = row["latency_ms"][b]
            assert 0 < lat["p50"] <= lat["p95"]
        assert row["throughput_rows_s"] > 0
    assert rep["rows"][0]["max_abs_diff"] is None and _row(rep, "model.onnx")["max_abs_diff"] <= 1e-5
    assert _row(rep, "model.int8.onnx")["agreement"] > 0.9
    assert any("dynamic quantization" in n for n in rep["notes"])


# --- pruning ---------------------------------------------------------------------------------------


def _pruned_and_tuned(breast, tmp_path, scope: str, workers: int | None) -> tuple[Path, dict]:
    run = shutil.copytree(
        breast[0], tmp_path / f"run-{scope}-{workers}"
    )  # not over the module's run's report
    rep = run_export(
        run,
        {
            "format": "safetensors",
            "prune": 0.6,
            "prune_scope": scope,
            "finetune_epochs": 2,
            "finetune_workers": workers,
            "latency_runs": 0,
        },
    )
    return run, rep


@pytest.mark.parametrize("scope,workers", [("global", None), ("layer", 2)])
def test_pruned_model_reaches_sparsity(breast, scope, workers, tmp_path):
    before = (breast[0] / "model" / "weights.safetensors").read_bytes()
    run, rep = _pruned_and_tuned(breast, tmp_path, scope, workers)
    tuned = rep["pruning"]["finetune"]
    assert rep["pruning"]["sparsity"] >= 0.6 - 1e-3 and len(tuned["val_loss"]) == 2
    # a distributed run of its own: coordinator and worker processes, the run's worker count by default
    child = Path(tuned["run_dir"])
    assert child == run / "exports" / "finetune" and tuned["workers"] == (
        workers or 1
    )  # the module run has 1
    gens = [json.loads(l) for l in (child / "events.jsonl").read_text().splitlines()]
    assert [len(e["members"]) for e in gens if e["kind"] == "generation"] == [tuned["workers"]]
    model = yaml.safe_load((child / "job.yaml").read_text())["model"]
    assert model["keep_zeros"] is True and model["init_weights"] == str(child / "init_weights.safetensors")
    # what was exported is the fine-tune's model, and the fine-tune moved the pruned weights
    exported, final = (
        load_file(str(f))
        for f in (run / "exports" / "model.pruned.safetensors", child / "model" / "weights.safetensors")
    )
    init = load_file(str(child / "init_weights.safetensors"))
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert any(not torch.equal(init[k], final[k]) for k in final if k.endswith("weight"))
    w = load_file(str(run / "exports" / "model.pruned.safetensors"))
    layers = [k for k in w if k.endswith("weight")]
    zeros = sum(int((w[k] == 0).sum()) for k in layers)
    total = sum(w[k].numel() for k in layers)
    assert zeros / total >= 0.6 - 1e-3  # fine-tuning kept the mask: the zeros are still there
    if scope == "layer":
        for k in layers:
            assert float((w[k] == 0).float().mean()) == pytest.approx(0.6, abs=1.0 / w[k].numel() + 1e-6)
    assert (run / "model" / "weights.safetensors").read_bytes() == before, "the run's model must not change"
    pruned = _row(rep, "model.pruned.safetensors")
    assert pruned["metrics"]["accuracy"] > 0.8  # fine-tuned: still a working classifier


def test_finetune_gives_the_same_model_for_any_worker_count(breast, tmp_path):
    """Invariant 1 holds for the fine-tune too: it is a Lepton run, and keep_zeros masks identically."""
    tuned = [
        load_file(
            str(_pruned_and_tuned(breast, tmp_path, "global", w)[0] / "exports" / "model.pruned.safetensors")
        )
        for w in (1, 3)
    ]
    diff = max(
        float((tuned[0][k] - tuned[1][k]).abs().max() / (tuned[1][k].abs().max() + 1e-12)) for k in tuned[1]
    )
    assert diff <= 1e-4, f"1 and 3 fine-tune workers differ by {diff:.2e}"
    assert all(torch.equal(tuned[0][k] == 0, tuned[1][k] == 0) for k in tuned[1])


def test_pruned_int8_onnx(breast, tmp_path):
    run = shutil.copytree(breast[0], tmp_path / "run")
    rep = run_export(run, {"format": "onnx", "quantize": "int8", "prune": 0.5, "latency_runs": 0})
    names = [r["name"] for r in rep["rows"]]
    assert names[1:] == ["pruned model (fp32 torch eager)", "model.pruned.onnx", "model.pruned.int8.onnx"]
    assert rep["pruning"]["finetune_epochs"] == 0 and rep["pruning"]["sparsity"] >= 0.5 - 1e-3
    p = load_artifact(run / "exports" / "model.pruned.int8.onnx")
    assert p.meta["artifact"]["pruning"]["amount"] == 0.5


# --- every format gives the same predictions ------------------------------------------------------


def test_every_format_agrees(breast):
    run, _ = breast
    ref = lepton.load(run).predict_file(str(BREAST_CSV))
    exports = run / "exports"
    for name in ("model.onnx", "model.torchscript", "model.safetensors"):
        got = load_artifact(exports / name).predict_file(str(BREAST_CSV))
        assert got["prediction"] == ref["prediction"], name
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-5, err_msg=name)
    for name in (
        "model.int8.onnx",
        "model.fp16.onnx",
        "model.fp16.safetensors",
        "model.fp16.torchscript",
        "model.bf16.onnx",
        "model.bf16.safetensors",
    ):
        got = load_artifact(exports / name).predict_file(str(BREAST_CSV))
        agree = np.mean([a == b for a, b in zip(got["prediction"], ref["prediction"])])
        assert agree >= 0.97, (name, agree)


def test_artifact_predictor_interface(breast, tmp_path):
    run, _ = breast
    p = load_artifact(run / "exports" / "model.int8.onnx")
    assert isinstance(p, ArtifactPredictor) and isinstance(p, lepton.Predictor)
    rows = _raw_rows(3)
    by_rows = p.predict_rows(rows)
    assert len(by_rows["prediction"]) == 3 and by_rows["probabilities"].shape == (3, 2)
    result = p.predict_file(str(BREAST_CSV))
    p.write_csv(result, str(tmp_path / "out.csv"))
    table = pacsv.read_csv(tmp_path / "out.csv")
    assert table.column_names == ["prediction", "prob_benign", "prob_malignant"]
    assert table.column("prediction").to_pylist()[:3] == by_rows["prediction"]


def test_regression_artifacts(tmp_path):
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.05 * g.normal(size=200)
    path = tmp_path / "reg.csv"
    path.write_text(
        "a,b,c,y\n" + "\n".join(",".join(f"{v:.6f}" for v in [*r, t]) for r, t in zip(x, y)) + "\n"
    )
    res = lepton.train(
        job_dict(path, task="regression", data__target="y", train__epochs=4),
        workers=1,
        run_dir=tmp_path / "run",
    )
    assert res.status == "completed", res.reason
    rep = run_export(res.run_dir, {"format": ["onnx", "safetensors"], "latency_runs": 0})
    assert {"mse", "r2"} <= rep["rows"][1]["metrics"].keys()
    ref = lepton.load(res.run_dir).predict_file(str(path))["prediction"]
    for name in ("model.onnx", "model.safetensors"):
        got = load_artifact(res.run_dir / "exports" / name).predict_file(str(path))
        assert "probabilities" not in got
        np.testing.assert_allclose(got["prediction"], ref, atol=1e-5)


def test_factory_model_artifacts_ship_standalone(tmp_path):
    def build(input_shape, num_outputs):  # a closure: only the run's cloudpickle can rebuild it
        return torch.nn.Sequential(
            torch.nn.Linear(input_shape[0], 10), torch.nn.ReLU(), torch.nn.Linear(10, num_outputs)
        )

    data = make_classification_csv(tmp_path / "data.csv")
    job = job_dict(data, train__epochs=3)
    job["model"] = {"type": "factory", "factory": build}
    res = lepton.train(job, workers=1, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    run_export(res.run_dir, {"format": ["onnx", "torchscript", "safetensors"], "latency_runs": 0})
    ref = lepton.load(res.run_dir).predict_file(str(data))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("model.onnx", "model.torchscript", "model.safetensors"):
        src = res.run_dir / "exports" / name
        got = load_artifact(src).predict_file(str(data))
        assert got["prediction"] == ref["prediction"], name
        (shipped / name).write_bytes(src.read_bytes())
    # copied away from the run: onnx and torchscript carry the whole graph ...
    for name in ("model.onnx", "model.torchscript"):
        assert load_artifact(shipped / name).predict_file(str(data))["prediction"] == ref["prediction"]
    # ... a safetensors file of a callable-built model cannot rebuild it, and says why
    with pytest.raises(LeptonError, match="model_factory.pkl"):
        load_artifact(shipped / "model.safetensors")


# --- bad artifacts and bad input ------------------------------------------------------------------


def test_missing_and_corrupt_artifacts(breast, tmp_path):
    run, _ = breast
    with pytest.raises(LeptonError, match="no such exported model file"):
        load_artifact(tmp_path / "absent.onnx")
    good = (run / "exports" / "model.onnx").read_bytes()
    cases = {
        "truncated.onnx": good[: len(good) // 2],
        "garbage.onnx": b"\x00not a model\xff" * 10,
        "empty.onnx": b"",
        "truncated.safetensors": (run / "exports" / "model.safetensors").read_bytes()[:100],
        "truncated.torchscript": (run / "exports" / "model.torchscript").read_bytes()[:200],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LeptonError, match=name.replace(".", r"\.")):
            load_artifact(tmp_path / name)
    # an ONNX model that did not come from `lepton export`: its preprocessing is unknown
    import onnx

    proto = onnx.load_from_string(good)
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "foreign.onnx"))
    with pytest.raises(LeptonError, match="no Lepton metadata"):
        load_artifact(tmp_path / "foreign.onnx")


def test_bad_input_to_an_artifact(breast, tmp_path):
    run, _ = breast
    p = load_artifact(run / "exports" / "model.onnx")
    lines = BREAST_CSV.read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index("mean_texture")
    missing = tmp_path / "missing.csv"
    missing.write_text(
        "\n".join(",".join(v for j, v in enumerate(l.split(",")) if j != drop) for l in lines) + "\n"
    )
    with pytest.raises(DataError, match="missing feature column\\(s\\) 'mean_texture'"):
        p.predict_file(str(missing))
    wrong = tmp_path / "wrong.csv"
    cells = [l.split(",") for l in lines[:6]]
    cells[3][header.index("mean_area")] = "large"
    wrong.write_text("\n".join(",".join(c) for c in cells) + "\n")
    with pytest.raises(DataError, match="column 'mean_area', row 3 \\(line 4\\): 'large' is not a number"):
        p.predict_file(str(wrong))
    with pytest.raises(LeptonError, match="must be numeric"):
        p.predict_array(np.array([["a"] * 30], dtype=object))
    with pytest.raises(LeptonError, match="shape"):
        p.predict_array(np.zeros((2, 7), dtype=np.float32))


def test_cli_errors(breast, tmp_path):
    run, _ = breast
    (tmp_path / "bad.onnx").write_bytes(b"garbage" * 20)
    expect_cli_error(
        run_cli("serve", tmp_path / "bad.onnx", "--bind", "127.0.0.1:0", timeout=60),
        "lepton serve: error:",
        "bad.onnx",
        "not a readable ONNX model",
    )
    expect_cli_error(
        run_cli("serve", tmp_path / "absent.onnx", "--bind", "127.0.0.1:0", timeout=60),
        "absent.onnx",
        "no such",
    )
    expect_cli_error(
        run_cli("export", run, "--format", "safetensors", "--quantize", "int8", timeout=60),
        "lepton export: error:",
        "needs --format onnx",
    )
    expect_cli_error(
        run_cli("export", run, "--prune", "1.5", timeout=60), "--prune: must be less than 1 (got 1.5)"
    )
    r = run_cli("export", run, "--quantize", "int8", "--int8-method", "weights", timeout=60)
    assert r.returncode == 2 and "--int8-method: invalid choice" in r.stderr.splitlines()[-1], r.stderr
    expect_cli_error(run_cli("export", tmp_path, timeout=60), "no trained model")
    damaged = tmp_path / "damaged"
    shutil.copytree(run / "model", damaged / "model")
    (damaged / "model" / "weights.safetensors").write_bytes(b"")
    expect_cli_error(
        run_cli("serve", damaged, "--bind", "127.0.0.1:0", timeout=60),
        "lepton serve: error:",
        "weights.safetensors: cannot read the weights",
    )
    with pytest.raises(SpecError, match="unknown field 'bogus'"):
        run_export(run, {"bogus": 1})
    with pytest.raises(SpecError, match="finetune_epochs"):
        run_export(run, {"finetune_epochs": 2})


def test_export_options_that_refine_another(breast, capsys):
    """--int8-method without --quantize int8, --prune-scope without --prune: an error, not ignored."""
    from lepton.cli import main

    run, _ = breast
    cases = [
        (["--int8-method", "dynamic"], "--int8-method dynamic applies only with --quantize int8"),
        (
            ["--quantize", "fp16", "--int8-method", "static"],
            "--int8-method static applies only with --quantize",
        ),
        (["--prune-scope", "layer"], "--prune-scope layer applies only with --prune"),
        # the errors name the flags, not the job keys they set
        (
            ["--finetune-workers", "2"],
            "--finetune-workers applies to a fine-tune: give --finetune-epochs too",
        ),
        (["--finetune-epochs", "1"], "--finetune-epochs fine-tunes a pruned model: give --prune too"),
        (
            ["--prune", "0.5", "--finetune-epochs", "1", "--finetune-workers", "0"],
            "--finetune-workers: must be greater than 0 (got 0)",
        ),
        (["--format", "onnx,xyz"], "--format: must be 'onnx', 'torchscript' or 'safetensors' (got 'xyz')"),
        (["--format", ","], "--format: give at least one of onnx, torchscript, safetensors"),
    ]
    for args, needle in cases:
        assert main(["export", str(run), *args, "--latency-runs", "0"]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert main(["export", str(run / "exports" / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: is a file; lepton export takes a run directory" in err and str(run) in err, err


def test_export_needs_test_or_validation_rows(tmp_path):
    from lepton.spec import parse_job

    job = job_dict(
        tmp_path / "d.csv", data__split={"train": 1.0, "val": 0.0, "test": 0.0}, eval__every="never"
    )
    job["export"] = {"format": "onnx"}
    with pytest.raises(SpecError, match=r"export: .*data\.split keeps none"):
        parse_job(job)
    job["data"]["split"] = {"train": 0.9, "val": 0.1, "test": 0.0}  # validation rows will do
    assert parse_job(job).export.formats == ["onnx"]


def test_export_failing_after_training_still_prints_the_summary(tmp_path):
    data = make_classification_csv(tmp_path / "d.csv", rows=40)
    # 0.99 of 40 rows rounds to all 40: no test row, which only the export phase finds out
    job = job_dict(
        data, train__epochs=2, data__split={"train": 0.99, "val": 0.0, "test": 0.01}, eval__every="never"
    )
    job["export"] = {"format": "onnx", "latency_runs": 0}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    r = run_cli(
        "train",
        tmp_path / "job.yaml",
        "--workers",
        "1",
        "--run-dir",
        tmp_path / "run",
        "--no-progress",
        timeout=180,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "run completed" in r.stdout and "accuracy" in r.stdout, r.stdout  # the training summary
    expect_cli_error(
        r,
        "lepton train: error: training completed (summary above), but the export failed:",
        "no prepared test (or validation) rows",
    )
    assert (tmp_path / "run" / "model" / "weights.safetensors").is_file()


def test_export_spec():
    assert ExportSpec().formats == ["onnx"] and ExportSpec().precision == "fp32"
    spec = ExportSpec.model_validate({"format": "onnx,safetensors,onnx", "quantize": "bf16", "prune": 0.3})
    assert spec.formats == ["onnx", "safetensors"] and spec.precision == "bf16"
    assert ExportSpec.model_validate({"format": ["torchscript"]}).formats == ["torchscript"]
    for bad in (
        {"format": "tflite"},
        {"prune": 0},
        {"quantize": "int4"},
        {"extra": 1},
        {"format": ["onnx", "torchscript"], "quantize": "int8"},
        {"int8_method": "weights"},
    ):
        with pytest.raises(ValueError):
            ExportSpec.model_validate(bad)


def test_predict_cli_with_artifact(breast, tmp_path):
    """`lepton predict EXPORT` once lepton.predict.load dispatches files to load_artifact."""
    run, _ = breast
    artifact = run / "exports" / "model.int8.onnx"
    r = run_cli("predict", artifact, "--input", BREAST_CSV, "--output", tmp_path / "o.csv", timeout=60)
    assert r.returncode == 0, r.stderr
    expected = load_artifact(artifact).predict_file(str(BREAST_CSV))["prediction"]
    assert pacsv.read_csv(tmp_path / "o.csv").column("prediction").to_pylist() == expected
    bad = tmp_path / "bad.csv"
    bad.write_text("mean_radius,foo\n1,2\n")
    expect_cli_error(
        run_cli("predict", artifact, "--input", bad, "--output", tmp_path / "x.csv", timeout=60),
        "missing feature column(s)",
    )
    (tmp_path / "corrupt.onnx").write_bytes(b"nope" * 10)
    expect_cli_error(
        run_cli(
            "predict",
            tmp_path / "corrupt.onnx",
            "--input",
            BREAST_CSV,
            "--output",
            tmp_path / "y.csv",
            timeout=60,
        ),
        "not a readable ONNX model",
    )


def test_export_cli_prints_table(breast, tmp_path):
    run = shutil.copytree(breast[0], tmp_path / "run")  # it writes exports: not into the module's run
    r = run_cli("export", run, "--format", "onnx", "--quantize", "fp16", "--latency-runs", "5", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model.fp16.onnx" in r.stdout and "report:" in r.stdout
    saved = json.loads((run / "exports" / "report.json").read_text())
    assert saved["spec"]["quantize"] == "fp16"


# --- lepton serve ---------------------------------------------------------------------------------


def _raw_rows(n: int, drop_target: bool = True) -> list[dict]:
    rows = list(csv.DictReader(open(BREAST_CSV)))[:n]
    for row in rows:
        if drop_target:
            del row["diagnosis"]
        for k in row:
            if k != "diagnosis":
                row[k] = float(row[k])
    return rows


def _first_line(proc, timeout: float = 90) -> str:
    """The URL `lepton serve` prints first."""
    line = first_line(proc, timeout)
    assert line.startswith("serving on http://"), (line, proc.poll())
    return line.split()[-1]


@pytest.mark.parametrize("target", ["exports/model.onnx", "."])
def test_serve_predictions_equal_lepton_predict(breast, procs, tmp_path, target):
    run, _ = breast
    out = tmp_path / "pred.csv"
    r = run_cli("predict", run, "--input", BREAST_CSV, "--output", out, timeout=60)
    assert r.returncode == 0, r.stderr
    expected = pacsv.read_csv(out)
    n = 40
    proc = procs.lepton("serve", run / target, "--bind", "127.0.0.1:0")
    url = _first_line(proc)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        body = c.post("/v1/predict", json={"rows": _raw_rows(n)})
        assert body.status_code == 200, body.text
        got = body.json()
    assert got["predictions"] == expected.column("prediction").to_pylist()[:n]
    probs = np.stack([expected.column(f"prob_{c}").to_numpy()[:n] for c in got["classes"]], 1)
    np.testing.assert_allclose(np.array(got["probabilities"]), probs, atol=1e-5)


def test_serve_rejects_bad_requests_and_keeps_serving(breast, procs):
    run, _ = breast
    proc = procs.lepton("serve", run / "exports" / "model.int8.onnx", "--bind", "127.0.0.1:0")
    url = _first_line(proc)
    good = {"rows": _raw_rows(2)}
    wrong_cols = {"rows": [{**_raw_rows(1)[0], "unexpected": 1.0}]}
    missing_col = {"rows": [{k: v for k, v in _raw_rows(1)[0].items() if k != "mean_radius"}]}
    not_number = {"rows": [{**_raw_rows(1)[0], "mean_area": "large"}]}
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/predict", json=good).status_code == 200
        cases = [
            (
                c.post("/v1/predict", content=b'{"rows": [', headers={"content-type": "application/json"}),
                400,
                "malformed JSON",
            ),
            (c.post("/v1/predict", json=wrong_cols), 422, "unknown column(s) 'unexpected'"),
            (c.post("/v1/predict", json=missing_col), 422, "missing feature column(s) 'mean_radius'"),
            (
                c.post("/v1/predict", json=not_number),
                422,
                "rows[0].mean_area: expected a number, got 'large'",
            ),
            (c.post("/v1/predict", json={"rows": []}), 422, "non-empty list"),
            (c.post("/v1/predict", json=["not", "an", "object"]), 422, "expected a JSON object"),
            (c.post("/v1/predict", content=b" " * (1 << 20) + b"{}"), 413, "larger than 1048576 bytes"),
            (c.post("/v1/predict", json={"rows": _raw_rows(1) * 3000}), 413, "larger than"),
        ]
        for resp, status, needle in cases:
            assert resp.status_code == status, (needle, resp.status_code, resp.text)
            assert needle in resp.json()["error"], (needle, resp.json())
        # a client that hangs up halfway through its body
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"rows": ['
            )
        time.sleep(0.5)
        # still serving, and still right
        again = c.post("/v1/predict", json=good)
        assert again.status_code == 200 and len(again.json()["predictions"]) == 2
        assert c.get("/healthz").status_code == 200
    assert proc.poll() is None
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


def test_bind_port_must_be_in_range():
    from lepton.cli_args import split_bind as _split_bind

    assert _split_bind("127.0.0.1:65535") == ("127.0.0.1", 65535) and _split_bind(":0") == ("127.0.0.1", 0)
    with pytest.raises(LeptonError, match="port 99999 is out of range"):
        _split_bind("127.0.0.1:99999")


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_serve_answers_4xx_for_values_the_model_cannot_take(breast, monkeypatch):
    """In process (the same app `lepton serve` runs): bodies the decoder cannot take are 400, values the
    model cannot take 422 naming rows[i].column (counted from 0 like every other message), and a
    reply JSON cannot carry is a 500 with a JSON message; the app keeps answering after each."""
    from fastapi.testclient import TestClient

    from lepton.export import serve

    run, _ = breast
    predictor = lepton.load(run)
    row = _raw_rows(1)[0]

    def with_area(text: str) -> bytes:  # a body whose rows[1].mean_area is this JSON text
        return json.dumps({"rows": [row, dict(row, mean_area="@")]}).replace('"@"', text).encode()

    cases = [
        (
            json.dumps({"rows": [row, dict(row, mean_smoothness=1e37)]}).encode(),
            422,
            "rows[1].mean_smoothness: 1e+37 is out of range",
        ),
        (with_area("1" + "0" * 400), 422, "rows[1].mean_area: out of range"),
        (with_area("1" + "0" * 5000), 422, "rows[1].mean_area: out of range"),
        (with_area("1e400"), 422, "rows[1].mean_area: out of range"),
        (with_area("null"), 422, "rows[1].mean_area: missing value"),
        (b"[" * 100000 + b"]" * 100000, 400, "malformed JSON: nested too deeply"),
        (b'{"rows": [\xff]}', 400, "malformed JSON: not UTF-8"),
    ]
    good = json.dumps({"rows": [row]}).encode()
    with TestClient(serve.make_app(predictor), raise_server_exceptions=False) as c:
        for body, status, needle in cases:
            resp = c.post("/v1/predict", content=body, headers={"content-type": "application/json"})
            assert resp.status_code == status, (needle, resp.status_code, resp.text)
            assert needle in resp.json()["error"], (needle, resp.json())
            assert c.post("/v1/predict", content=good).status_code == 200
        # finite input so large that the network overflows inside: the row's largest value is named
        real = predictor.forward
        monkeypatch.setattr(
            predictor,
            "forward",
            lambda x: np.where(np.abs(x).max(1, keepdims=True) > 1e3, np.nan, real(x)).astype(np.float32),
        )
        resp = c.post("/v1/predict", json={"rows": [row, dict(row, mean_area=1e6)]})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"].startswith(
            "rows[1].mean_area: 1000000.0 is too far outside the training data"
        )
        monkeypatch.undo()
        # a reply that JSON cannot carry: a 500 with a JSON message, not the framework's plain text
        monkeypatch.setattr(serve, "predict_response", lambda p, t: {"predictions": [float("nan")]})
        resp = c.post("/v1/predict", content=good)
        assert resp.status_code == 500 and "internal error" in resp.json()["error"], resp.text
