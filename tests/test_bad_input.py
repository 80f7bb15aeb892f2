"""Bad input: one clear line naming the problem, a non-zero exit, no traceback, nothing written."""

import hashlib
import re
from pathlib import Path

import pytest
import yaml

from conftest import expect_cli_error, job_dict, make_classification_csv, run_cli

pytestmark = pytest.mark.timeout(120)


def _write_job(tmp_path, job, name="job.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(job) if isinstance(job, dict) else job)
    return p


def _expect_error(tmp_path, job_file, *needles, extra=()):
    run_dir = tmp_path / "never-created"
    expect_cli_error(
        run_cli("train", job_file, "--run-dir", run_dir, "--no-progress", *extra, timeout=60), *needles
    )
    assert not run_dir.exists(), "a refused job must not create its run directory"


def test_a_run_dir_url_of_an_unknown_storage_is_one_line_not_a_local_folder(tmp_path, csv_data):
    """A URL is never a local folder (``s3://b/r`` must not become ``./s3:/b/r``): one whose fsspec
    filesystem is unknown is one clear line (a missing bucket: test_s3.py)."""
    job = _write_job(tmp_path, job_dict(csv_data))
    r = run_cli("train", job, "--run-dir", "nosuchfs://bucket/run", "--no-progress", timeout=60, cwd=tmp_path)
    expect_cli_error(r, "nosuchfs://bucket/run", "cannot open this storage URL")
    assert not (tmp_path / "nosuchfs:").exists()


def test_missing_data_file(tmp_path):
    job = _write_job(tmp_path, job_dict(tmp_path / "nope.csv"))
    _expect_error(tmp_path, job, "nope.csv", "not found")


def test_missing_job_file(tmp_path):
    _expect_error(tmp_path, tmp_path / "absent.yaml", "absent.yaml", "not found")


def test_missing_target_column(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data, data__target="species"))
    _expect_error(tmp_path, job, "target column 'species' not found", "data.csv")


# an infinity made the fitted mean infinite and every loss NaN: the run died as "diverged"
@pytest.mark.parametrize(
    "line,col,value,needles",
    [
        (17, 2, "abc", ("column 'f2'", "row 17 (line 18)", "'abc' is not a number")),
        (9, 3, "inf", ("column 'f3'", "row 9 (line 10)", "inf is not a finite number")),
    ],
)
def test_a_bad_value_names_the_row(tmp_path, line, col, value, needles):
    data = make_classification_csv(tmp_path / "d.csv", rows=60)
    lines = data.read_text().splitlines()
    cells = lines[line].split(",")
    cells[col] = value
    lines[line] = ",".join(cells)
    data.write_text("\n".join(lines) + "\n")
    job = _write_job(tmp_path, job_dict(data))
    _expect_error(tmp_path, job, *needles)


def test_all_rows_dropped(tmp_path):
    data = tmp_path / "holes.csv"
    data.write_text("a,b,label\n1,,x\n,2,y\n3,,x\n")
    job = _write_job(tmp_path, job_dict(data))
    _expect_error(tmp_path, job, "no rows left after cleaning")


def test_label_outside_classes(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data, data__classes=["c0", "c1"]))
    _expect_error(tmp_path, job, "label 'c2' is not one of the model's classes", "data.classes")


def test_unknown_model_type(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data, model__type="transformer"))
    _expect_error(tmp_path, job, "model.type", "'mlp', 'cnn' or 'factory'", "transformer")


def test_init_weights_are_checked_before_anything_is_written(tmp_path, csv_data):
    """model.init_weights that is missing, not safetensors, or another model's; keep_zeros without it."""
    import torch
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    other = tmp_path / "other.safetensors"
    save_file({"0.weight": torch.zeros(3, 3)}, str(other))
    wrong = tmp_path / "wrong.safetensors"  # this model's names, another width
    save_file(
        {
            "0.weight": torch.zeros(7, 6),
            "0.bias": torch.zeros(7),
            "2.weight": torch.zeros(3, 7),
            "2.bias": torch.zeros(3),
        },
        str(wrong),
    )
    cases = [
        (
            {"init_weights": str(tmp_path / "absent.safetensors")},
            ("model.init_weights", "absent.safetensors", "no such file"),
        ),
        (
            {"init_weights": str(garbage)},
            ("model.init_weights", "garbage.safetensors", "not a readable safetensors"),
        ),
        ({"init_weights": str(other)}, ("model.init_weights", "not this model's weights", "unexpected")),
        ({"init_weights": str(wrong)}, ("model.init_weights", "0.weight has shape [7, 6]", "[8, 6]")),
        ({"keep_zeros": True}, ("model.keep_zeros", "init_weights")),
    ]
    for i, (fields, needles) in enumerate(cases):
        job = job_dict(csv_data, model__layers=[{"units": 8, "activation": "relu"}])
        job["model"].update(fields)
        _expect_error(tmp_path, _write_job(tmp_path, job, f"job{i}.yaml"), *needles)


def test_unknown_optimizer(tmp_path, csv_data):
    job = job_dict(csv_data)
    job["train"]["optimizer"]["name"] = "lbfgs"
    _expect_error(tmp_path, _write_job(tmp_path, job), "train.optimizer.name", "'sgd', 'adam' or 'adamw'")


def test_unknown_field_lists_allowed(tmp_path, csv_data):
    job = job_dict(csv_data)
    job["train"]["epoch"] = 3
    _expect_error(tmp_path, _write_job(tmp_path, job), "unknown field 'train.epoch'", "epochs")


def test_malformed_yaml(tmp_path):
    job = _write_job(tmp_path, "name: x\ndata: {path: a.csv\nmodel: [\n")
    _expect_error(tmp_path, job, "malformed YAML", "line")


@pytest.mark.parametrize("bs", [0, -4])
def test_non_positive_batch_size(tmp_path, csv_data, bs):
    job = _write_job(tmp_path, job_dict(csv_data, train__batch_size=bs))
    _expect_error(tmp_path, job, "train.batch_size", "greater than 0")


def test_more_workers_than_global_batch(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data, train__batch_size=4))
    _expect_error(tmp_path, job, "cluster.workers (5)", "train.batch_size (4)", extra=("--workers", "5"))


def test_bad_override(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data))
    _expect_error(tmp_path, job, "--set: train.epochs", extra=("--set", "train.epochs=zero"))


def _snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_existing_run_is_never_overwritten(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data, train__epochs=1))
    run_dir = tmp_path / "run"
    assert run_cli("train", job, "--run-dir", run_dir, "--no-progress").returncode == 0
    before = _snapshot(run_dir)
    # a good job into an occupied run directory, and a bad one
    r = run_cli("train", job, "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    bad = _write_job(tmp_path, job_dict(tmp_path / "missing.csv"), "bad.yaml")
    r = run_cli("train", bad, "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _snapshot(run_dir) == before


def test_cuda_requested_without_a_gpu(tmp_path, csv_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = _write_job(tmp_path, job_dict(csv_data))
    _expect_error(tmp_path, job, "cluster.device is 'cuda'", extra=("--set", "cluster.device=cuda"))


# --- reading data files (lepton.storage.tables: shared by train and predict) ----------------------


def test_duplicate_column_name_is_named(tmp_path):
    from lepton.errors import DataError
    from lepton.storage.tables import read_table

    p = tmp_path / "dup.csv"
    p.write_text("a,b,a,label\n1,2,3,x\n4,5,6,y\n")
    with pytest.raises(DataError, match=r"dup\.csv: duplicate column name\(s\) 'a' \(2 times\)"):
        read_table(str(p))


def test_truncated_npz(tmp_path):
    import numpy as np

    from lepton.errors import DataError
    from lepton.storage.tables import read_table

    np.savez(tmp_path / "ok.npz", x=np.zeros((50, 3)), y=np.arange(50))
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.npz: cannot read as npz"):
        read_table(str(tmp_path / "cut.npz"))


def test_unopenable_data_file_names_it(tmp_path, monkeypatch):
    import fsspec

    from lepton.errors import DataError
    from lepton.storage.tables import read_table

    (tmp_path / "plain").write_text("x")
    with pytest.raises(DataError, match=r"plain/data\.csv: cannot open: Not a directory"):
        read_table(str(tmp_path / "plain" / "data.csv"))

    def refused(*a, **kw):  # what a protected file or a network filesystem raises (root reads anything)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fsspec, "open", refused)
    with pytest.raises(DataError, match=r"data\.csv: cannot open: Permission denied"):
        read_table(str(tmp_path / "data.csv"))


def test_data_path_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("x")
    job = _write_job(tmp_path, job_dict(tmp_path / "plain" / "data.csv"))
    _expect_error(tmp_path, job, "plain/data.csv", "cannot open: Not a directory")


# --- command-line options ------------------------------------------------------------------------------


def test_counts_and_cores_are_checked_before_anything_is_written(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data))
    run_dir = tmp_path / "never-created"
    r = run_cli("train", job, "--run-dir", run_dir, "--no-progress", "--threads", "-2", timeout=60)
    assert r.returncode == 2 and "--threads: invalid positive integer value: '-2'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()
    from lepton.cli_args import cpus as _cpus
    from lepton.errors import LeptonError

    assert _cpus("0") == [0]
    for bad in ("3-1", "-1", "x", "0,100000"):
        with pytest.raises(LeptonError, match="--cpus"):
            _cpus(bad)


def test_a_run_directory_that_cannot_be_created(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data))
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    r = run_cli("train", job, "--run-dir", afile, "--no-progress", timeout=60)
    assert r.returncode == 2 and "cannot create the run directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and afile.read_text() == "not a folder"


def test_set_does_not_apply_to_resume(tmp_path):
    r = run_cli("train", "--resume", "--run-dir", tmp_path, "--set", "train.epochs=41", timeout=60)
    assert r.returncode == 2 and "--set does not apply to --resume" in r.stderr, r.stderr


def test_summary_says_how_many_epochs_ran():
    from rich.console import Console

    from lepton.console import summary_table

    con = Console(record=True, width=120)
    con.print(summary_table({"status": "completed", "steps": 182, "epochs": 14, "epochs_planned": 40}, "run"))
    assert "14 of 40" in con.export_text()


# --- found by an audit of bad input (session 15) -----------------------------------------------------


def test_a_folder_that_holds_no_run_is_never_written_into(tmp_path, csv_data):
    job = _write_job(tmp_path, job_dict(csv_data, train__epochs=1))
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.safetensors").write_bytes(b"the user's own file")
    (mine / "notes.txt").write_text("mine")
    before = _snapshot(mine)
    expect_cli_error(
        run_cli("train", job, "--run-dir", mine, "--no-progress", timeout=60),
        str(mine),
        "not empty and holds no run",
    )
    assert _snapshot(mine) == before


@pytest.mark.parametrize(
    "text,needles",
    [
        (b"name: x\ntrain:\n  epochs: 40\n  epochs: 1\n", ("key 'epochs' appears twice", "line 4")),
        (b"\xff\xfen\x00a\x00m\x00e\x00", ("not UTF-8 text",)),
    ],
)
def test_job_files_that_yaml_would_misread(tmp_path, text, needles):
    from lepton.errors import SpecError
    from lepton.spec import load_job

    p = tmp_path / "job.yaml"
    p.write_bytes(text)
    with pytest.raises(SpecError) as e:
        load_job(p)
    assert all(n in str(e.value) for n in needles), str(e.value)


@pytest.mark.parametrize(
    "layers,needle",
    [
        ([{"units": "ten"}], "model.layers[0].units"),
        ([{"units": 4}, {"units": 4, "dropout": 1}], "model.layers[1].dropout"),
    ],
)
def test_layer_errors_name_the_layers_field(tmp_path, csv_data, layers, needle):
    from lepton.errors import SpecError
    from lepton.spec import parse_job

    job = job_dict(csv_data)
    job["model"]["layers"] = layers
    with pytest.raises(SpecError, match=re.escape(needle)):
        parse_job(job)
    job["model"] = {"type": "cnn", "layers": [{"type": "conv", "filters": 2}, {"units": 3}]}
    with pytest.raises(SpecError, match=re.escape("model.layers[1]: a cnn layer needs a type")):
        parse_job(job)
    job["model"] = {"type": "factory", "factory": "factory_models:build", "layers": [{"units": 3}]}
    with pytest.raises(SpecError, match="model.layers is not used with type 'factory'"):
        parse_job(job)


def _rows(n=12):
    return b"".join(b"%d,%d,%s\n" % (i, i % 3, b"xy"[i % 2 : i % 2 + 1]) for i in range(n))


@pytest.mark.parametrize(
    "content,needles",
    [
        (b"a,b,label\n1,2,x\n3,4\n5,6,y\n", ("line 3", "Expected 3 columns")),
        (b"a,\xe4b,label\n1,2,x\n", ("header is not UTF-8",)),
        (b"a,b,label\n1,2,x\n3,4,malign\xe9nt\n" + _rows(), ("column 'label' row 2", "not UTF-8")),
        (b"a,,label\n" + _rows(), ("column 2 has no name",)),
    ],
)
def test_csv_problems_are_named_where_they_are(tmp_path, content, needles):
    from lepton.errors import DataError
    from lepton.spec import parse_job
    from lepton.storage.prepared import prepare

    p = tmp_path / "d.csv"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        prepare(parse_job(job_dict(p)))
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_columns_the_job_does_not_read_may_be_anything(tmp_path):
    """A trailing comma on every line (an unnamed empty column) and a non-UTF-8 column the job does not
    use are no reason to refuse the data."""
    from lepton.spec import parse_job
    from lepton.storage.prepared import prepare

    p = tmp_path / "d.csv"
    p.write_bytes(b"a,b,label,\n" + _rows().replace(b"\n", b",\n"))
    assert prepare(parse_job(job_dict(p))).preprocessor.feature_names == ["a", "b"]
    p.write_bytes(b"a,b,label,note\n" + _rows().replace(b"\n", b",caf\xe9\n"))
    assert prepare(parse_job(job_dict(p, data__features=["a", "b"]))).report["train_rows"] > 0


def test_a_factory_that_raises_or_gives_the_wrong_outputs(tmp_path, csv_data):
    (tmp_path / "bad_factories.py").write_text(
        "from torch import nn\n"
        "def boom(shape, n):\n    raise RuntimeError('boom in user factory')\n"
        "def seven(shape, n):\n    return nn.Linear(shape[0], 7)\n"
    )
    for name, needles in (
        ("boom", ("model.factory", "RuntimeError: boom in user factory")),
        ("seven", ("model: gives output (2, 7)", "expected (2, 3)")),
    ):
        job = job_dict(csv_data)
        job["model"] = {"type": "factory", "factory": f"bad_factories:{name}"}
        run_dir = tmp_path / f"never-{name}"
        r = run_cli(
            "train",
            _write_job(tmp_path, job),
            "--run-dir",
            run_dir,
            "--no-progress",
            timeout=60,
            env={"PYTHONPATH": str(tmp_path)},
        )
        expect_cli_error(r, *needles)
        assert not run_dir.exists()


def test_an_empty_or_wrong_token_file(tmp_path):
    from lepton.client import read_token
    from lepton.errors import LeptonError

    (tmp_path / "empty").write_text("")
    with pytest.raises(LeptonError, match="not a token file"):
        read_token(str(tmp_path / "empty"))
    with pytest.raises(LeptonError, match="is a folder"):
        read_token(str(tmp_path))


def test_yaml_merge_keys_still_load(tmp_path, csv_data):
    from lepton.spec import load_job

    job = job_dict(csv_data)
    text = yaml.safe_dump({k: v for k, v in job.items() if k != "train"})
    p = tmp_path / "job.yaml"
    p.write_text(text + "train:\n  <<: {epochs: 2, batch_size: 8}\n  epochs: 3\n")
    t = load_job(p).train
    assert (t.epochs, t.batch_size) == (3, 8)


def test_an_empty_data_path_and_runs_on_a_file(tmp_path, csv_data):
    from lepton.errors import LeptonError, SpecError
    from lepton.runs import list_runs
    from lepton.spec import parse_job

    with pytest.raises(SpecError, match="data.path: String should have at least 1 character"):
        parse_job(job_dict(""))
    with pytest.raises(LeptonError, match="is a file, not a folder"):
        list_runs(csv_data)
