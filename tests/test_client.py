"""The coordinator client."""

import pytest

from lepton.errors import LeptonError


def test_a_malformed_coordinator_url_is_one_clear_error():
    from lepton.client import CoordinatorClient

    with pytest.raises(LeptonError, match="not a coordinator URL"):
        CoordinatorClient("http://127.0.0.1:70OO", "token")
    with pytest.raises(LeptonError, match="not a coordinator URL"):
        CoordinatorClient("ftp://127.0.0.1:7000", "token").status()
