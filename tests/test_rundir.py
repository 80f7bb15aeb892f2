"""What a run keeps on disk: checkpoints, the final model, and the prepared data and checkpoints on resume."""

import pytest

from conftest import job_dict
from lepton.errors import LeptonError
from lepton.spec import parse_job
from lepton.storage.rundir import RunDir


def test_a_crash_while_a_checkpoint_of_the_same_step_is_replaced_leaves_one_readable(tmp_path):
    """The same step saved twice (a periodic save, then the final one): the old folder is moved aside,
    not deleted, before the new one is renamed in. A crash in between leaves only the moved one, which
    reading the checkpoint (and --resume's check) still finds."""
    import torch

    from lepton.storage.checkpoint import read_checkpoint, readable_state_dir, write_checkpoint

    run = RunDir(tmp_path / "run")
    path = write_checkpoint(run, 40, {"w": torch.ones(3)}, keep=2)
    path.rename(path.with_name(f".{path.name}.old"))  # the state a crash after the move leaves
    assert readable_state_dir(path) is not None
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(3))
    write_checkpoint(run, 40, {"w": torch.zeros(3)}, keep=2)  # and a later save of that step replaces it
    assert torch.equal(read_checkpoint(path)["w"], torch.zeros(3))
    assert readable_state_dir(path) == path and not path.with_name(f".{path.name}.old").exists()


def test_final_model_of_a_model_with_tied_weights_is_written(tmp_path):
    import torch

    from lepton.storage.checkpoint import read_model, write_model

    emb = torch.nn.Embedding(5, 4)
    dec = torch.nn.Linear(4, 5, bias=False)
    dec.weight = emb.weight  # tied: one tensor under two names
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
    make_classification_csv(data, rows=200, seed=5)  # edited
    with pytest.raises(LeptonError, match="another lepton process is running this run"):
        open_run(None, tmp_path / "run", resume=True)  # the first still holds it
    first.release()
    again = open_run(None, tmp_path / "run", resume=True)
    again.release()
    assert again.train_rows == first.train_rows
    assert (tmp_path / "run" / "data" / "manifest.json").read_text() == manifest
    assert "resuming with the run's prepared data" in capsys.readouterr().err
    data.unlink()  # gone
    assert open_run(None, tmp_path / "run", resume=True).train_rows == first.train_rows


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
    (tmp_path / "run" / "state.json").write_text(
        json.dumps({"status": "stopped", "latest_checkpoint": {"step": 10, "path": str(original)}})
    )
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
