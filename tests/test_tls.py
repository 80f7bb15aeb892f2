"""TLS on the control plane (coordinator/tls.py): a coordinator with ``--tls on`` serves HTTPS under a CA
of its run; a worker that trusts that CA (the join file) trains; the wrong CA, no token, or plain HTTP are
refused. Real processes, a real uvicorn TLS server, on loopback (``--tls auto`` turns it on off loopback)."""

from __future__ import annotations

import json
import ssl

import httpx
import pytest
import yaml

from conftest import coordinator_url, expect_cli_error, job_dict, make_classification_csv, run_cli
from lepton.coordinator.tls import server_tls, wants_tls
from lepton.storage.rundir import RunDir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_tls_is_on_by_default_off_loopback():
    assert wants_tls("auto", "10.0.0.1") and wants_tls("auto", "0.0.0.0")
    assert not wants_tls("auto", "127.0.0.1") and not wants_tls("auto", "::1")
    assert wants_tls("on", "127.0.0.1") and not wants_tls("off", "10.0.0.1")


def test_a_worker_with_the_join_file_trains(procs, tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(data, train__epochs=1)))
    run = tmp_path / "run"
    job = tmp_path / "job.yaml"
    coord = procs.lepton("coordinator", job, "--run-dir", run, "--workers", 1, "--tls", "on")
    url = coordinator_url(coord)
    assert url.startswith("https://127.0.0.1:"), url
    join = json.loads((run / "join").read_text())
    assert oct((run / "join").stat().st_mode & 0o777) == "0o600"
    assert oct((run / "tls/ca.key").stat().st_mode & 0o777) == "0o600"
    assert join["url"] == url and join["token"] == (run / "token").read_text().strip()
    ca = ssl.create_default_context(cadata=join["ca"])
    auth = {"Authorization": f"Bearer {join['token']}"}
    assert httpx.get(f"{url}/v1/status", headers=auth, verify=ca, timeout=10).status_code == 200
    assert httpx.get(f"{url}/v1/status", verify=ca, timeout=10).status_code == 401
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets no answer
        httpx.get(url.replace("https://", "http://") + "/v1/status", headers=auth, timeout=10)
    with pytest.raises(httpx.ConnectError):  # the system's CAs do not vouch for a run's certificate
        httpx.get(f"{url}/healthz", timeout=10)

    # a CA of another run: refused with one line, at once (no retrying until the connect timeout)
    other = RunDir(tmp_path / "other")
    (tmp_path / "other").mkdir()
    (tmp_path / "wrong-ca.pem").write_text(server_tls(other, "127.0.0.1").ca_pem)
    token_file = run / "token"
    r = run_cli(
        "worker",
        "--coordinator",
        url,
        "--token-file",
        token_file,
        "--ca-file",
        tmp_path / "wrong-ca.pem",
        timeout=60,
    )
    expect_cli_error(r, "not signed by the run's CA")

    w = procs.lepton("worker", "--join", run / "join")
    assert w.wait(timeout=120) == 0, w.stderr.read()
    assert coord.wait(timeout=60) == 0, coord.stderr.read()
    assert (run / "model" / "weights.safetensors").exists()
