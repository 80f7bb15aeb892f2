"""Preprocessing of the prepared data: dedupe, imputing, one-hot, statistics fitted on train only."""

import numpy as np
import pytest

from conftest import job_dict
from lepton.errors import DataError
from lepton.spec import parse_job
from lepton.storage.prepared import prepare


def _prep(tmp_path, text, **over):
    p = tmp_path / "d.csv"
    p.write_text(text)
    return prepare(parse_job(job_dict(p, **over)))


def test_dedupe_impute_and_categorical(tmp_path):
    rows = ["x,color,label"] + [
        f"{i % 7},{'red' if i % 2 else 'blue'},{'a' if i % 3 else 'b'}" for i in range(40)
    ]
    rows += ["1,red,a", ",blue,b"]
    pre = _prep(
        tmp_path,
        "\n".join(rows) + "\n",
        data__preprocess={"missing": "mean", "dedupe": True, "normalize": "minmax"},
    )
    assert pre.report["duplicates_dropped"] > 0
    assert pre.report["missing_features"] == 1
    x = np.concatenate([pre.arrays[f"{s}_x"] for s in ("train", "val", "test")])
    assert x.shape[1] == 3  # x + one-hot(blue, red)
    assert not np.isnan(x).any()
    onehot = x[:, 1:]
    assert set(onehot.sum(1).tolist()) == {1.0}
    train = pre.arrays["train_x"][:, 0]
    assert train.min() == pytest.approx(0) and train.max() == pytest.approx(1)  # fitted on train only


def test_statistics_fitted_on_train_only(tmp_path):
    rows = ["x,label"] + [f"{i},{'a' if i % 2 else 'b'}" for i in range(100)]
    pre = _prep(tmp_path, "\n".join(rows) + "\n")
    tr = pre.arrays["train_x"][:, 0]
    assert tr.mean() == pytest.approx(0, abs=1e-6) and tr.std() == pytest.approx(1, abs=1e-5)
    assert abs(pre.arrays["test_x"][:, 0].mean()) > 1e-4


def test_single_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="single class"):
        _prep(tmp_path, "x,label\n1,a\n2,a\n3,a\n")
