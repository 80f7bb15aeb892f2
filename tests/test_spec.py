"""The job spec: defaults, --set overrides, and errors that name the field."""

import pytest

from conftest import job_dict
from lepton.errors import SpecError
from lepton.spec import parse_job


def test_spec_defaults_and_overrides(tmp_path):
    job = parse_job(job_dict(tmp_path / "d.csv"), overrides=["train.epochs=7", "cluster.shares=[1,3]"])
    assert job.train.epochs == 7 and job.cluster.shares == [1, 3]
    assert job.data.preprocess.normalize == "standard"


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"model__type": "rnn"}, "model.type"),
        ({"train__batch_size": 0}, "train.batch_size"),
        ({"data__split": {"train": 0.5, "val": 0.1, "test": 0.1}}, "must be 1.0"),
        ({"cluster__shares": [1, 2, 3]}, "cluster.shares has 3 entries for 2 workers"),
        ({"model__layers": [{"units": 0}]}, "greater than 0"),
    ],
)
def test_spec_errors_name_the_field(tmp_path, over, needle):
    with pytest.raises(SpecError, match=None) as e:
        parse_job(job_dict(tmp_path / "d.csv", **over))
    assert needle in str(e.value)
