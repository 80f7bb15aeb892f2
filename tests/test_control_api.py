"""The control API under bad input (fast tier): messages validated by kind, a worker speaking only
for itself (its credential), only a current member's reports counting, and the failure rule for
errors that workers report (FailurePolicy.worker_error)."""

import threading
import warnings

import pytest
from pydantic import ValidationError

from fakes import make_coordinator, ready
from lepton.coordinator.auth import WorkerCredentials
from lepton.coordinator.server import build_app
from lepton.coordinator.state import Phase
from lepton.protocol import CREDENTIAL_HEADER, Heartbeat, RegisterRequest, Report
from lepton.records import TrainRecord
from lepton.storage.rundir import RunDir

TOKEN = {"Authorization": "Bearer tok"}


def _client(c):
    with warnings.catch_warnings():  # starlette's note about its httpx-based test client
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    return TestClient(build_app(c, "tok", threading.Lock(), 0, None), follow_redirects=False)


def _register(client) -> tuple[str, dict]:
    r = client.post("/v1/register", json={"host": "h", "pid": 1}, headers=TOKEN)
    assert r.status_code == 200
    body = r.json()
    return body["worker_id"], {**TOKEN, CREDENTIAL_HEADER: body["credential"]}


# --- validation by kind -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,payload",
    [
        ("checkpoint", {"path": "/x"}),  # no step: was a KeyError and a 500
        ("checkpoint", {"step": -1, "path": "/x"}),
        ("checkpoint", {"step": 3}),
        ("paused", {"reason": "bored", "generation": 0, "step": 1}),
        ("paused", {"reason": "regroup", "generation": 0}),
        ("failed", {}),
        ("failed", {"error": ""}),
        ("metrics", {"records": "not a list"}),
        ("finished", {"step": "x"}),
        ("nonsense", {}),
    ],
)
def test_a_malformed_report_is_a_422_and_never_reaches_the_controller(tmp_path, kind, payload):
    c, _ = make_coordinator(tmp_path, 1)
    with pytest.raises(ValidationError):
        Report(worker_id="w", kind=kind, payload=payload)
    with _client(c) as client:
        wid, headers = _register(client)
        before = len(c.events)
        r = client.post(
            "/v1/report", json={"worker_id": wid, "kind": kind, "payload": payload}, headers=headers
        )
        assert r.status_code == 422, r.text
        assert len(c.events) == before and not c.phase.final


@pytest.mark.parametrize(
    "beat",
    [
        {"step": -1},
        {"generation": 0, "rank": 2, "world": 2},
        {"world": 0},
        {"samples_per_s": -1.0},
        {"shares": [0.5, -0.5]},
    ],
)
def test_a_malformed_heartbeat_is_a_422(tmp_path, beat):
    c, _ = make_coordinator(tmp_path, 1)
    with _client(c) as client:
        wid, headers = _register(client)
        r = client.post("/v1/heartbeat", json={"worker_id": wid, **beat}, headers=headers)
        assert r.status_code == 422, r.text


# --- a worker speaks only for itself ----------------------------------------------------------------


def test_heartbeat_plan_and_report_need_the_credential_of_the_worker_they_name(tmp_path):
    c, _ = make_coordinator(tmp_path, 2)
    with _client(c) as client:
        a, a_headers = _register(client)
        b, b_headers = _register(client)
        for headers in (TOKEN, {**TOKEN, CREDENTIAL_HEADER: "forged"}, b_headers):
            assert client.post("/v1/heartbeat", json={"worker_id": a}, headers=headers).status_code == 403
            assert client.get("/v1/plan", params={"worker_id": a}, headers=headers).status_code == 403
            failed = {"worker_id": a, "kind": "failed", "payload": {"error": "forged"}}
            assert client.post("/v1/report", json=failed, headers=headers).status_code == 403
        assert c.members[a].state == "joining" and not c.phase.final
        assert client.post("/v1/heartbeat", json={"worker_id": a}, headers=a_headers).status_code == 200
        assert client.get("/v1/plan", params={"worker_id": a}, headers=a_headers).status_code == 200
        # without the token, the credential alone is not enough
        no_token = {CREDENTIAL_HEADER: a_headers[CREDENTIAL_HEADER]}
        assert client.post("/v1/heartbeat", json={"worker_id": a}, headers=no_token).status_code == 401


def test_credentials_outlive_the_coordinator_so_a_resumed_one_can_adopt(tmp_path):
    """The key lives in the run directory: a coordinator restarted on it verifies the same credentials."""
    run = RunDir(tmp_path / "run")
    first = WorkerCredentials(run.worker_key()).issue("w0-abc")
    again = WorkerCredentials(RunDir(tmp_path / "run").worker_key())
    assert again.verify("w0-abc", first) and not again.verify("w1-abc", first)
    assert (tmp_path / "run" / "worker_key").stat().st_mode & 0o777 == 0o600
    assert not WorkerCredentials(RunDir(tmp_path / "other").worker_key()).verify("w0-abc", first)


def test_the_root_url_redirects_to_the_dashboard_without_a_secret(tmp_path):
    c, _ = make_coordinator(tmp_path, 1)
    with _client(c) as client:
        r = client.get("/")
        assert r.status_code in (302, 307) and r.headers["location"] == "/dashboard"
        assert "tok" not in r.headers["location"]
        assert client.get("/dashboard").status_code == 401  # the page still wants the token


# --- only a current member's reports count ------------------------------------------------------------


def test_reports_about_another_generation_or_from_a_non_member_change_nothing(tmp_path):
    c, _ = make_coordinator(tmp_path, 2, cluster__max_workers=2)
    a, b = ready(c, 1), ready(c, 2)
    s = ready(c, 3)  # a standby: the generation is full
    assert c.generation == 0 and c.generation_members == [a, b] and c.phase == Phase.RUNNING
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "regroup", "generation": 7, "step": 5}))
    c.report(Report(worker_id=s, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 5}))
    c.report(Report(worker_id=s, kind="checkpoint", payload={"step": 99, "path": "/forged"}))
    c.report(Report(worker_id=s, kind="finished", payload={"step": 99, "summary": {"steps": 99}}))
    c.report(Report(worker_id="w-nobody", kind="failed", payload={"error": "boom"}))
    assert c.phase == Phase.RUNNING and c.generation_members == [a, b]
    assert c.members[a].state == "training" and c.members[s].state == "standby"
    assert c.latest_checkpoint is None and c.summary is None
    assert sum(e["kind"] == "report_ignored" for e in c.events) == 4


def test_registrations_alone_never_form_a_generation(tmp_path):
    c, clock = make_coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=5)
    for pid in range(5):
        c.register(RegisterRequest(host="forged", pid=100 + pid))
    assert c.generation is None and c.phase == Phase.WAITING
    clock.t = 6.0
    c.tick()  # never heard of again: lost, and nothing else happens
    assert all(m.state == "lost" for m in c.members.values()) and not c.phase.final
    a, b = ready(c, 1), ready(c, 2)
    assert c.generation == 0 and c.generation_members == [a, b]


def test_records_of_the_wrong_types_are_journaled_not_acted_on(tmp_path):
    c, _ = make_coordinator(tmp_path, 1)
    a = ready(c, 1)
    good = TrainRecord(
        step=3, epoch=0, total_steps=9, loss=1.0, lr=0.1, samples_per_s=1.0, generation=0, workers=1
    ).to_dict()
    bad = [
        {**good, "step": "x"},
        {"kind": ["train"]},
        {"kind": "best", "time": 1.0, "step": 1, "value": "high", "metric": "m"},
        {
            "kind": "decision",
            "decision": "lr",
            "time": 1.0,
            "step": 2,
            "reason": "r",
            "lr": 0.1,
            "details": {"step": 5, "kind": "x", "lr": 0.2},
        },
    ]
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=1, records=bad))
    c.report(Report(worker_id=a, kind="metrics", payload={"records": [good]}))
    assert c.step == 3 and not c.phase.final
    c.status()  # the status view copes with what was taken


# --- the failure rule ----------------------------------------------------------------------------------


def test_one_members_error_is_a_lost_worker_and_the_others_go_on(tmp_path):
    c, _ = make_coordinator(tmp_path, 2, cluster__min_workers=1)
    a, b = ready(c, 1), ready(c, 2)
    c.heartbeat(Heartbeat(worker_id=a, generation=0, step=4))
    c.report(Report(worker_id=b, kind="failed", payload={"error": "ValueError: only here", "generation": 0}))
    assert c.members[b].state == "lost" and c.phase == Phase.REGROUPING
    c.report(Report(worker_id=a, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 4}))
    assert c.phase == Phase.RUNNING and c.generation == 1 and c.generation_members == [a]


@pytest.mark.parametrize(
    "error,reason",
    [
        ("KeyError: 'label'", "every worker failed (2 of 2 with the same error)"),
        ("training diverged: 3 steps in a row with a non-finite loss", "training diverged"),
    ],
)
def test_every_member_reporting_an_error_fails_the_run_with_it(tmp_path, error, reason):
    c, _ = make_coordinator(tmp_path, 2)
    a, b = ready(c, 1), ready(c, 2)
    c.report(Report(worker_id=a, kind="failed", payload={"error": error, "generation": 0}))
    assert not c.phase.final  # one of two: not yet the run's error
    c.report(Report(worker_id=b, kind="failed", payload={"error": error, "generation": 0}))
    assert c.phase == Phase.FAILED and reason in c.reason and error in c.reason


def test_the_last_member_standing_reporting_an_error_fails_the_run(tmp_path):
    """A deterministic bug that only rank 0 hits: rank 0 is lost, the survivor becomes rank 0 of the
    next generation, hits it too, and the run fails instead of waiting for ever."""
    c, _ = make_coordinator(tmp_path, 2, cluster__min_workers=1)
    a, b = ready(c, 1), ready(c, 2)
    c.report(Report(worker_id=a, kind="failed", payload={"error": "ZeroDivisionError", "generation": 0}))
    c.report(Report(worker_id=b, kind="paused", payload={"reason": "regroup", "generation": 0, "step": 0}))
    assert c.generation == 1 and c.generation_members == [b] and not c.phase.final
    c.report(Report(worker_id=b, kind="failed", payload={"error": "ZeroDivisionError", "generation": 1}))
    assert c.phase == Phase.FAILED and f"worker {b} failed: ZeroDivisionError" in c.reason


# --- generated messages with valid credentials: whatever validates, the controller takes -------------


def test_generated_messages_from_real_members_never_raise_in_the_controller(tmp_path):
    """schemathesis, in process: every generated request speaks for a worker with that worker's own
    credential (half of them for the generation's members), so everything that validates reaches
    the controller, which must answer it without a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    c, _ = make_coordinator(tmp_path, 2, cluster__min_workers=1)
    members = [ready(c, 1), ready(c, 2)]
    creds = WorkerCredentials(c.run.worker_key())
    app = build_app(c, "tok", threading.Lock(), 0, None, creds)
    schema = schemathesis.openapi.from_dict(app.openapi())
    seen: dict[int, int] = {}

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy())
    def run(case):
        n = sum(seen.values())
        speak_for = members[n // 2 % 2] if n % 2 == 0 else None
        if isinstance(case.body, dict) and "worker_id" in case.body:
            if speak_for:
                case.body["worker_id"] = speak_for
            wid = case.body["worker_id"]
        elif case.query and "worker_id" in case.query:
            if speak_for:
                case.query["worker_id"] = speak_for
            wid = case.query["worker_id"]
        else:
            wid = None
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if isinstance(wid, str):
            headers[CREDENTIAL_HEADER] = creds.issue(wid)
        case.headers = headers
        r = case.call(app=app, headers=TOKEN)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.method, case.path, case.body, r.text[:300])

    run()
    assert seen.get(200, 0) > 0
    c.status()
