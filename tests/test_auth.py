"""Invariant 6: every coordinator endpoint but the liveness probe needs the job's token."""
import re

import httpx
import pytest
import yaml

from conftest import Procs, job_dict, make_classification_csv

pytestmark = pytest.mark.timeout(120)

PROTECTED = [("POST", "/v1/register", {"host": "h", "pid": 1}),
             ("POST", "/v1/heartbeat", {"worker_id": "w0"}),
             ("GET", "/v1/plan?worker_id=w0", None),
             ("POST", "/v1/report", {"worker_id": "w0", "kind": "metrics"}),
             ("GET", "/v1/status", None)]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(make_classification_csv(tmp / "data.csv"))))
    run_dir = tmp / "run"
    procs = Procs()
    p = procs.lepton("coordinator", job, "--run-dir", run_dir, "--workers", 2)
    url = re.search(r"(http://\S+)", p.stdout.readline()).group(1)
    yield url, (run_dir / "token").read_text().strip(), run_dir
    procs.reap()


def test_liveness_probe_is_open(coordinator):
    url, _, _ = coordinator
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.mark.parametrize("method,path,body", PROTECTED)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic abc"])
def test_protected_endpoints_refuse(coordinator, method, path, body, header):
    url, _, _ = coordinator
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, url + path, json=body, headers=headers)
    assert r.status_code == 401


def test_right_token_is_accepted(coordinator):
    url, token, _ = coordinator
    r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["status"] == "waiting"


def test_worker_with_bad_token_cannot_join(coordinator, procs, tmp_path):
    url, token, _ = coordinator
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    w = procs.lepton("worker", "--coordinator", url, "--token-file", bad)
    assert w.wait(timeout=60) == 2
    err = w.stderr.read()
    assert "refused the token (401)" in err and "Traceback" not in err
    st = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}).json()
    assert st["workers"] == []


def test_status_command_shows_the_job(coordinator):
    from conftest import run_cli
    url, _, run_dir = coordinator
    r = run_cli("status", url, "--token-file", run_dir / "token", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "waiting" in r.stdout and "t:" in r.stdout
    r = run_cli("status", url, "--token-file", run_dir / "token", "--json", timeout=60)
    assert '"status": "waiting"' in r.stdout
