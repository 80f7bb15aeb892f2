"""`lepton runs`: run directories with their status, progress, best validation metric and test metric."""

import argparse
import json
import os

import pytest
import yaml

import lepton
from conftest import job_dict, make_classification_csv, run_cli
from lepton.errors import LeptonError
from lepton.runs import add_runs_command, list_runs

pytestmark = pytest.mark.timeout(180)


def _fake_run(root, name, task, status, step, total, evals, test=None, mtime=None, torn=False):
    d = root / name
    d.mkdir(parents=True)
    (d / "job.yaml").write_text(yaml.safe_dump({"name": f"job-{name}", "task": task}))
    (d / "state.json").write_text(
        json.dumps(
            {
                "status": status,
                "reason": "",
                "name": f"job-{name}",
                "step": step,
                "total_steps": total,
                "epoch": 1,
            }
        )
    )
    lines = [
        json.dumps({"kind": "train", "step": s, "loss": 1.0, "samples_per_s": 10.0})
        for s in range(1, step + 1)
    ]
    lines += [json.dumps({"kind": "eval", "split": "val", "step": s, "count": 10, **m}) for s, m in evals]
    lines.append(
        json.dumps(
            {
                "kind": "eval",
                "split": "test",
                "step": step,
                "count": 10,
                "accuracy": 1.0,
                "mse": 0.0,
                "loss": 0.0,
            }
        )
    )  # never taken for validation
    text = "\n".join(lines) + "\n" + ('{"kind": "eval", "split": "val", "accur' if torn else "")
    (d / "metrics.jsonl").write_text(text)
    if test is not None:
        (d / "summary.json").write_text(
            json.dumps({"status": status, "steps": step, "test": {"count": 10, **test}})
        )
    if mtime is not None:
        for p in d.iterdir():
            os.utime(p, (mtime, mtime))
        os.utime(d, (mtime, mtime))
    return d


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    _fake_run(
        root,
        "cls",
        "classification",
        "completed",
        30,
        30,
        [
            (10, {"loss": 0.9, "accuracy": 0.5}),
            (20, {"loss": 0.4, "accuracy": 0.9}),
            (30, {"loss": 0.3, "accuracy": 0.8}),
        ],
        test={"loss": 0.35, "accuracy": 0.85},
        mtime=1_000_000,
        torn=True,
    )
    _fake_run(
        root,
        "reg",
        "regression",
        "running",
        7,
        40,
        [
            (2, {"loss": 3.0, "mse": 3.0, "mae": 1.0, "r2": 0.1}),
            (4, {"loss": 1.5, "mse": 1.5, "mae": 0.9, "r2": 0.5}),
            (6, {"loss": 2.0, "mse": 2.0, "mae": 0.8, "r2": 0.4}),
        ],
        mtime=3_000_000,
    )
    _fake_run(root, "broken", "classification", "failed", 3, 30, [], mtime=2_000_000)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    (root / "stray.txt").write_text("not a run either")
    return root


def test_list_runs_reads_status_progress_and_best_metric(runs_root):
    rows = list_runs(runs_root)
    assert [r["name"] for r in rows] == ["reg", "broken", "cls"]  # most recently modified first
    by = {r["name"]: r for r in rows}
    cls, reg, broken = by["cls"], by["reg"], by["broken"]
    assert (cls["status"], cls["step"], cls["total_steps"], cls["job"]) == ("completed", 30, 30, "job-cls")
    assert cls["best"] == {"metric": "accuracy", "mode": "max", "value": 0.9, "step": 20}  # max accuracy
    assert cls["test"] == {"metric": "accuracy", "value": 0.85}
    assert reg["status"] == "running" and reg["task"] == "regression"
    assert reg["best"] == {"metric": "mse", "mode": "min", "value": 1.5, "step": 4}  # min MSE
    assert reg["test"] is None
    assert broken["status"] == "failed" and broken["best"] is None
    assert cls["modified"] == pytest.approx(1_000_000)


def test_a_run_directory_itself_and_bad_folders(runs_root, tmp_path):
    assert [r["name"] for r in list_runs(runs_root / "cls")] == ["cls"]
    assert list_runs(runs_root / "notes") == []
    with pytest.raises(LeptonError, match="no such folder"):
        list_runs(tmp_path / "missing")
    half = runs_root / "half"
    half.mkdir()
    (half / "state.json").write_text('{"status": "runn')  # torn: shown, not an error
    assert {r["name"]: r["status"] for r in list_runs(runs_root)}["half"] == "unknown"


def test_a_folder_that_cannot_be_read_is_skipped(runs_root, monkeypatch):
    """Another user's 0700 run folder (simulated: tests run as root, which reads everything)."""
    from lepton.storage.rundir import RunDir

    real = RunDir.holds_run

    def holds_run(self):
        if self.root.name == "cls":
            raise PermissionError(13, "Permission denied", str(self.root / "state.json"))
        return real(self)

    monkeypatch.setattr(RunDir, "holds_run", holds_run)
    assert [r["name"] for r in list_runs(runs_root)] == ["reg", "broken"]


def test_runs_command_prints_a_table_and_json(runs_root, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    parser = argparse.ArgumentParser(prog="lepton")
    add_runs_command(parser.add_subparsers(dest="cmd"))
    a = parser.parse_args(["runs", str(runs_root)])
    assert a.handler(a) == 0
    out = capsys.readouterr().out
    for text in (
        "cls",
        "reg",
        "broken",
        "completed",
        "running",
        "failed",
        "0.9000 acc @20",
        "1.5000 mse @4",
        "0.8500 acc",
        "30/30",
        "7/40",
    ):
        assert text in out, text
    a = parser.parse_args(["runs", str(runs_root), "--json"])
    assert a.handler(a) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["reg", "broken", "cls"]
    assert parser.parse_args(["runs"]).dir == "runs"


def test_lepton_runs_lists_a_real_run(tmp_path):
    root = tmp_path / "runs"
    data = make_classification_csv(tmp_path / "data.csv")
    res = lepton.train(job_dict(data, train__epochs=2), workers=1, run_dir=root / "real")
    assert res.status == "completed", res.reason
    _fake_run(root, "other", "classification", "stopped", 5, 30, [(5, {"loss": 1.0, "accuracy": 0.4})])
    r = run_cli("runs", root, timeout=60, env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "real" in r.stdout and "completed" in r.stdout and "other" in r.stdout and "stopped" in r.stdout
    best = json.loads(run_cli("runs", root, "--json", timeout=60).stdout)
    real = next(x for x in best if x["name"] == "real")
    vals = [json.loads(l) for l in (root / "real" / "metrics.jsonl").read_text().splitlines()]
    accs = [v["accuracy"] for v in vals if v.get("kind") == "eval" and v.get("split") == "val"]
    assert real["best"]["metric"] == "accuracy" and real["best"]["value"] == max(accs)
    assert real["test"]["value"] == pytest.approx(res.summary["test"]["accuracy"])
    assert f"{real['step']}/{real['total_steps']}" in r.stdout
    r = run_cli("runs", tmp_path / "nowhere", timeout=60)
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr
