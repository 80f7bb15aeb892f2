"""The HTTP APIs fuzzed from their OpenAPI schemas (schemathesis) and flooded with requests.

Neither server publishes a schema (it would answer without the token): each test builds it from the
app (``app.openapi()``) and points schemathesis at the live server on loopback. With the token no
generated request may get a 5xx or a traceback; without it every protected route answers 401; and a
coordinator training real workers through all of it completes with the members it should have.
The number of generated requests is bounded (``EXAMPLES``) so that each test takes seconds."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis
import yaml

from conftest import REPO, Procs, job_dict, make_classification_csv, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

EXAMPLES = 120  # generated requests per fuzz run (over every operation of the schema)


# --- processes: logs to files (a server that logs a traceback per request must not block on a pipe) --


class Started(Procs):
    """``Procs`` whose processes write their output to a log file instead of a pipe."""

    def lepton(self, log: Path, *args) -> subprocess.Popen:
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", "lepton", *map(str, args)],
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self.procs.append(p)
        return p


@pytest.fixture
def started():
    s = Started()
    yield s
    s.reap()


def _url_in(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 90) -> str:
    found: list[str] = []

    def seen() -> bool:
        assert proc.poll() is None, log.read_text()
        m = re.search(pattern, log.read_text())
        if m:
            found.append(m.group(1))
        return bool(m)

    wait_for(seen, timeout, f"the URL in {log.name}")
    return found[0]


def _training_job(tmp: Path, epochs: int) -> Path:
    data = make_classification_csv(tmp / "data.csv", rows=1000)
    job = job_dict(data, train__epochs=epochs, checkpoint__every_steps=400)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _start_training(started: Started, tmp: Path, epochs: int):
    """A coordinator and two real workers, training; returns (url, token, run_dir, coordinator, workers)."""
    run_dir = tmp / "run"
    coord_log = tmp / "coordinator.log"
    coord = started.lepton(
        coord_log, "coordinator", _training_job(tmp, epochs), "--run-dir", run_dir, "--workers", 2
    )
    url = _url_in(coord_log, r"listening on (http://\S+)", coord)
    token = (run_dir / "token").read_text().strip()
    workers = [
        started.lepton(
            tmp / f"worker-{k}.log", "worker", "--coordinator", url, "--token-file", run_dir / "token"
        )
        for k in range(2)
    ]
    headers = {"Authorization": f"Bearer {token}"}
    wait_for(
        lambda: httpx.get(f"{url}/v1/status", headers=headers).json()["status"] == "running", 90, "training"
    )
    return url, token, run_dir, coord, workers


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines()]


def _coordinator_schema() -> dict:
    """The coordinator's OpenAPI schema, from its app (a throwaway controller in a scratch folder)."""
    import tempfile
    import threading as th

    from fakes import make_coordinator
    from lepton.coordinator.server import build_app

    with tempfile.TemporaryDirectory() as d:
        c, _ = make_coordinator(Path(d), 2)
        return build_app(c, "unused", th.Lock(), 0, None).openapi()


# --- the fuzzer ------------------------------------------------------------------------------------


def fuzz(raw_schema: dict, base_url: str, token: str | None, examples: int = EXAMPLES, check=None) -> dict:
    """Send ``examples`` generated requests; ``check(case, response)`` judges each one (default: no 5xx,
    no traceback). ``token``: sent as the bearer header, replacing whatever was generated for it;
    None: no Authorization header at all. Returns the count of answers by status."""
    from hypothesis import HealthCheck, Phase, settings

    schema = schemathesis.openapi.from_dict(raw_schema)
    counts: dict[int, int] = {}
    session = __import__("requests").Session()

    def judge(case, response):
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        assert "Traceback" not in response.text, response.text[:500]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=schema.as_strategy())
    def run(case):
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.headers = headers
        extra = {"Authorization": f"Bearer {token}"} if token is not None else None
        response = case.call(base_url=base_url, session=session, headers=extra, timeout=15)
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
        (check or judge)(case, response)

    run()
    session.close()
    return counts


# --- the coordinator, training ----------------------------------------------------------------------


def test_fuzzing_the_coordinator_while_it_trains_breaks_nothing(started, tmp_path):
    url, token, run_dir, coord, workers = _start_training(started, tmp_path, epochs=150)
    real = {w.pid for w in workers}
    schema = _coordinator_schema()
    t0 = time.monotonic()
    with_token = fuzz(schema, url, token)
    t1 = time.monotonic()

    def refused(case, response):
        assert response.status_code == 401, (
            case.method,
            case.path,
            response.status_code,
            response.text[:300],
        )

    protected = {
        p: {m: op for m, op in ops.items()} for p, ops in schema["paths"].items() if p not in ("/healthz",)
    }
    without = fuzz({**schema, "paths": protected}, url, None, examples=60, check=refused)
    print(
        f"\nfuzz: {sum(with_token.values())} requests with the token in {t1 - t0:.1f} s: {with_token};"
        f" {sum(without.values())} without: {without}"
    )
    assert set(without) == {401}
    assert coord.wait(timeout=180) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    for w in workers:
        assert w.wait(timeout=30) == 0
    log = (tmp_path / "coordinator.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "completed", state
    ev = _events(run_dir)
    ids = {
        e["worker"]
        for e in ev
        if e["kind"] == "worker_registered" and e["reason"].endswith(tuple(f"(pid {p})" for p in real))
    }
    assert len(ids) == 2
    generations = [e for e in ev if e["kind"] == "generation"]
    assert generations and all(set(g["members"]) == ids for g in generations), generations
    assert not [e for e in ev if e["kind"] == "worker_lost" and e["worker"] in ids]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["workers"] == 2 and {m["worker"] for m in summary["members"]} == ids


# --- lepton serve -----------------------------------------------------------------------------------


def _serve_schema(features: list[str]) -> dict:
    """``lepton serve``'s schema from its app, with the body it reads by hand described."""
    from lepton.export import serve

    class _P:  # what make_app reads of a predictor
        meta: dict = {"name": "m"}
        classes = ["a"]
        preprocessor = type("Pre", (), {"feature_names": features})()

        def describe(self):
            return {}

    schema = serve.make_app(_P()).openapi()  # type: ignore[arg-type]
    # the model's columns as numbers: most generated bodies are requests it can answer (a 200), the
    # rest probe its limits (huge values, empty rows); free-form rows would nearly all be a 422
    row = {
        "type": "object",
        "properties": {f: {"type": "number"} for f in features},
        "required": features,
        "additionalProperties": False,
    }
    body = {"type": "object", "properties": {"rows": {"type": "array", "items": row}}, "required": ["rows"]}
    schema["paths"]["/v1/predict"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": body}},
    }
    return schema


def test_fuzzing_lepton_serve_gets_no_5xx(started, tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(data, train__epochs=2, cluster__workers=1)))
    r = subprocess.run(
        [sys.executable, "-m", "lepton", "train", job, "--workers", "1", "--run-dir", tmp_path / "run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    log = tmp_path / "serve.log"
    proc = started.lepton(log, "serve", tmp_path / "run", "--bind", "127.0.0.1:0")
    url = _url_in(log, r"serving on (http://\S+)", proc)
    features = httpx.get(f"{url}/healthz").json()["features"]
    counts = fuzz(_serve_schema(features), url, None)
    print(f"\nserve fuzz: {sum(counts.values())} requests: {counts}")
    assert proc.poll() is None and httpx.get(f"{url}/healthz").status_code == 200
    assert "Traceback" not in log.read_text()


# --- a request flood while training ----------------------------------------------------------------


def _steps(url: str, headers: dict) -> tuple[float, int]:
    return time.monotonic(), int(httpx.get(f"{url}/v1/status", headers=headers).json()["step"])


@pytest.mark.parametrize("rate", [200, None], ids=["200-per-s", "as-fast-as-it-can"])
def test_a_request_flood_while_training_starves_no_heartbeat(started, tmp_path, rate):
    """A client sending bad and valid requests while 2 workers train. ``rate``: requests per second
    (a misbehaving client), or None: as fast as 4 threads can, which on a 2-core machine takes
    processor time from the workers by itself, so only the heartbeats' health is judged there.
    60 epochs of 44 steps: longer than the two 4 s windows at the ~175 steps/s measured here."""
    url, token, run_dir, coord, workers = _start_training(started, tmp_path, epochs=60)
    headers = {"Authorization": f"Bearer {token}"}
    window_s, max_requests, threads = 4.0, 4000, 4
    gap = threads / rate if rate else 0.0  # each thread's pace
    t0, s0 = _steps(url, headers)
    time.sleep(window_s)
    t1, s1 = _steps(url, headers)
    sent = [0] * threads
    stop = threading.Event()
    bad = {"worker_id": "w0-nobody", "kind": "checkpoint", "payload": {"path": "/x"}}

    def flood(k: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            next_at = time.monotonic()
            while not stop.is_set() and sent[k] < max_requests // threads:
                if gap:
                    next_at += gap
                    stop.wait(max(0.0, next_at - time.monotonic()))
                i = sent[k] % 4
                if i == 0:
                    c.get("/v1/status", headers=headers)
                elif i == 1:
                    c.post("/v1/heartbeat", json={"worker_id": "w0-nobody"}, headers=headers)  # 403
                elif i == 2:
                    c.post("/v1/report", json=bad, headers=headers)  # 422
                else:
                    c.get("/v1/plan", params={"worker_id": "w0"})  # 401
                sent[k] += 1

    pool = [threading.Thread(target=flood, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    time.sleep(window_s)
    t2, s2 = _steps(url, headers)
    stop.set()
    for t in pool:
        t.join(timeout=15)
    quiet, flooded = (s1 - s0) / (t1 - t0), (s2 - s1) / (t2 - t1)
    print(
        f"\nstep rate: {quiet:.0f} steps/s without the flood, {flooded:.0f} steps/s during it"
        f" ({sum(sent)} requests in {t2 - t1:.1f} s, {sum(sent) / (t2 - t1):.0f} requests/s)"
    )
    assert coord.wait(timeout=180) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "completed", state
    assert not [e for e in _events(run_dir) if e["kind"] in ("worker_lost", "regroup")]
