"""Monitoring: the dashboard (in a real headless Chromium), its JSON feed and /metrics for Prometheus.

The browser tests need Debian's chromium (``apt-get install -y chromium``) and the ``playwright``
Python package; they fail, not skip, without them. Playwright's own browser download is not used.
"""

import json
import math
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import Procs, coordinator_url, job_dict, make_classification_csv
from lepton.coordinator.auth import cookie_name, dashboard_url
from lepton.coordinator.controller import Controller
from lepton.coordinator.dashboard import MetricsHistory, Series, downsample
from lepton.coordinator.server import build_app
from lepton.protocol import RegisterRequest
from lepton.spec import parse_job
from lepton.storage.rundir import RunDir

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("LEPTON_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROUTES = [
    "/dashboard",
    "/dashboard/static/dashboard.js",
    "/dashboard/static/dashboard.css",
    "/dashboard/api/state",
    "/dashboard/api/history",
    "/metrics",
]
REQUIRED_SERIES = [
    "lepton_step",
    "lepton_epoch",
    "lepton_samples_per_second",
    "lepton_loss",
    "lepton_generation",
    "lepton_workers",
    "lepton_worker_samples_per_second",
    "lepton_worker_share",
    "lepton_failures",
    "lepton_validation_metric",
]
TOKEN = "tok-" + "x" * 40


# --- downsampling ----------------------------------------------------------------------------------------
def test_series_stays_bounded_and_keeps_the_mean():
    s = Series(max_points=500)
    n = 100_000
    for i in range(n):
        s.add(i, 2.0 * i)
    pts = s.points()
    assert 250 <= len(pts) <= 500 and s.count == n
    xs = [p[0] for p in pts]
    assert xs == sorted(xs) and xs[0] < n / 100 and xs[-1] > n * 0.99
    assert all(y == pytest.approx(2 * x, rel=1e-5) for x, y in pts)  # bucket means of a line lie on it
    assert len(downsample(((i, 1.0) for i in range(10)), 500)) == 10  # short series pass unchanged


def test_series_drops_a_rewound_trajectory_and_non_finite_values():
    s = Series(max_points=50)
    for i in range(200):
        s.add(i, 1.0)
    s.add(120, 5.0)  # a generation restarted from step 120: the curve follows it
    s.add(121, float("nan"))
    pts = s.points()
    assert pts[-1] == [120.0, 5.0] and all(x <= 120 for x, _ in pts)


def test_history_reads_only_whole_lines_incrementally(tmp_path):
    path = tmp_path / "metrics.jsonl"
    h = MetricsHistory(RunDir(tmp_path), max_points=100)
    assert h.snapshot()["series"] == {}  # no file yet
    rec = {"kind": "train", "step": 1, "loss": 0.5, "samples_per_s": 100.0, "lr": 0.01}
    torn = json.dumps({"kind": "eval", "split": "val", "step": 2, "loss": 0.4, "accuracy": 0.75, "count": 9})
    path.write_text(json.dumps(rec) + "\n" + torn[:20])
    snap = h.snapshot()
    assert snap["series"] == {
        "train/loss": [[1.0, 0.5]],
        "train/samples_per_s": [[1.0, 100.0]],
        "train/lr": [[1.0, 0.01]],
    }
    with open(path, "a") as f:
        f.write(
            torn[20:] + "\n" + '{"kind": "eval", "split": "test", "step": 3, "accuracy": 0.5, "count": 3}\n'
        )
    snap = h.snapshot()
    assert snap["series"]["val/accuracy"] == [[2.0, 0.75]] and "val/count" not in snap["series"]
    assert "test/accuracy" not in snap["series"] and snap["last_eval"]["test"]["accuracy"] == 0.5


def test_history_of_a_run_on_an_object_store_follows_its_appended_segments():
    """metrics.jsonl on an object store is segments (storage/backend.py); the history reads what they
    gained, at most every REMOTE_REFRESH_S."""
    import uuid

    from lepton.storage.backend import FsspecStorage

    now = [0.0]
    run = RunDir(FsspecStorage(f"memory://hist-{uuid.uuid4().hex}", object_store=True))
    h = MetricsHistory(run, max_points=100, clock=lambda: now[0])
    assert h.snapshot()["series"] == {}
    run.append_metric({"kind": "train", "step": 1, "loss": 0.5})
    now[0] += 10
    assert h.snapshot()["series"]["train/loss"] == [[1.0, 0.5]]
    run.append_metric({"kind": "train", "step": 2, "loss": 0.25})
    assert h.snapshot()["series"]["train/loss"] == [[1.0, 0.5]]  # not read again yet
    now[0] += 10
    assert h.snapshot()["series"]["train/loss"] == [[1.0, 0.5], [2.0, 0.25]]


# --- the routes, in process ------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    job = parse_job(job_dict(make_classification_csv(tmp_path / "data.csv")), source="job")
    coord = Controller(job, RunDir(tmp_path / "run"), target_workers=2, train_rows=168)
    app = build_app(coord, TOKEN, threading.Lock(), 0, None)
    with warnings.catch_warnings():  # starlette's note about its httpx-based test client
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    with TestClient(app) as client:
        yield coord, client


def _request(client, path, header=None, cookie=None):
    client.cookies.clear()
    if cookie is not None:
        client.cookies.set(cookie_name(TOKEN), cookie)
    return client.get(path, headers={"Authorization": header} if header else {})


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("how", ["nothing", "wrong bearer", "basic", "wrong cookie", "wrong query"])
def test_every_monitoring_route_refuses_without_the_token(served, path, how):
    _, client = served
    r = _request(
        client,
        path + ("?token=nope" if how == "wrong query" else ""),
        header={"wrong bearer": "Bearer nope", "basic": "Basic abc"}.get(how),
        cookie="nope" if how == "wrong cookie" else None,
    )
    assert r.status_code == 401
    assert TOKEN not in r.text


@pytest.mark.parametrize("path", ROUTES)
def test_bearer_or_cookie_opens_every_route(served, path):
    _, client = served
    assert _request(client, path, header=f"Bearer {TOKEN}").status_code == 200
    assert _request(client, path, cookie=TOKEN).status_code == 200


def test_token_in_the_url_sets_an_httponly_cookie_and_assets_are_local(served):
    _, client = served
    client.cookies.clear()
    r = client.get("/dashboard", params={"token": TOKEN})
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    cookie = r.headers["set-cookie"]
    assert (
        cookie.startswith(cookie_name(TOKEN) + "=")
        and "HttpOnly" in cookie
        and "samesite=lax" in cookie.lower()
    )
    assert "default-src 'none'" in r.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]*)"', r.text)
    assert refs and all(not re.match(r"^[a-z]+://|^//", u) for u in refs), refs
    assert client.get("/dashboard/api/state").status_code == 200  # the cookie alone now
    js = client.get("/dashboard/static/dashboard.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/dashboard/static/nope.js").status_code == 404
    assert client.get("/healthz").status_code == 200
    assert dashboard_url("http://h:1/", "a b") == "http://h:1/dashboard?token=a%20b"


def _add_workers_and_metrics(coord, steps=30):
    wids = [coord.register(RegisterRequest(host=f"host{i}", pid=1000 + i)) for i in range(2)]
    for step in range(1, steps + 1):
        coord.run.append_jsonl(
            coord.run.metrics_jsonl,
            {
                "kind": "train",
                "step": step,
                "epoch": 0,
                "loss": 1 / step,
                "samples_per_s": 500.0 + step,
                "lr": 0.01,
            },
        )
        if step % 10 == 0:
            coord.run.append_jsonl(
                coord.run.metrics_jsonl,
                {
                    "kind": "eval",
                    "split": "val",
                    "step": step,
                    "loss": 0.5,
                    "accuracy": step / 100,
                    "count": 36,
                },
            )
    coord.process_exited(1001, -9)
    return wids


def test_metrics_parse_with_the_prometheus_parser(served):
    coord, client = served
    _add_workers_and_metrics(coord)
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert set(REQUIRED_SERIES) <= set(families), sorted(families)
    sample = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert sample[("lepton_failures_total", ())] == 1
    assert sample[("lepton_workers", (("state", "lost"),))] == 1
    assert sample[("lepton_workers", (("state", "joining"),))] == 1
    assert sample[("lepton_validation_metric", (("metric", "accuracy"),))] == pytest.approx(0.3)
    assert sample[("lepton_status", (("status", "waiting"),))] == 1
    assert sample[("lepton_learning_rate", ())] == pytest.approx(0.01)
    assert math.isnan(sample[("lepton_generation", ())])  # no generation yet
    workers = {s.labels["worker"] for s in families["lepton_worker_samples_per_second"].samples}
    assert len(workers) == 2
    assert "lepton_registry" not in r.text and "python_gc" not in r.text  # a registry of its own


def test_state_and_history_feed_the_page(served):
    coord, client = served
    wids = _add_workers_and_metrics(coord, steps=3000)
    client.cookies.set(cookie_name(TOKEN), TOKEN)
    st = client.get("/dashboard/api/state").json()
    assert st["name"] == "t" and "batch_size: 16" in st["job_yaml"] and st["events_total"] >= 3
    by_id = {w["worker_id"]: w for w in st["workers"]}
    assert by_id[wids[1]]["state"] == "lost" and by_id[wids[0]]["device"].startswith("cpu")
    kinds = [e["kind"] for e in st["events"]]
    assert kinds.count("worker_registered") == 2 and "worker_lost" in kinds
    h = client.get("/dashboard/api/history").json()
    assert h["raw_points"]["train/loss"] == 3000 and len(h["series"]["train/loss"]) <= 500
    assert len(h["series"]["val/accuracy"]) == 300


# --- a real browser on a real job ----------------------------------------------------------------------
def _playwright():
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        pytest.fail(
            f"the dashboard tests need Chromium at {CHROMIUM}: install it with "
            "`apt-get update && apt-get install -y chromium` (or point LEPTON_CHROMIUM at one)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the dashboard tests need the playwright package: pip install playwright "
            "(no `playwright install`: the tests drive the system's Chromium)"
        )
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory, request):
    """A coordinator waiting for 2 workers, on a job long enough to watch (12 epochs, 50 ms per step)."""
    tmp = tmp_path_factory.mktemp("dash")
    job = job_dict(make_classification_csv(tmp / "data.csv"), train__epochs=12, train__log_every_steps=2)
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    run_dir = tmp / "run"
    procs = Procs()
    request.addfinalizer(procs.reap)  # also when the set-up below fails
    coord = procs.lepton("coordinator", tmp / "job.yaml", "--run-dir", run_dir, "--workers", 2)
    url = coordinator_url(coord)
    yield procs, coord, url, (run_dir / "token").read_text().strip(), run_dir


def test_browser_is_refused_without_the_token(browser, live):
    _, _, url, token, _ = live
    page = browser.new_page()
    try:
        for address in (
            f"{url}/dashboard",
            f"{url}/dashboard?token=wrong",
            f"{url}/dashboard/api/state",
            f"{url}/metrics",
        ):
            r = page.goto(address)
            assert r.status == 401, address
            assert token not in page.content()
        assert "needs the job's token" in page.goto(f"{url}/dashboard").text()
    finally:
        page.context.close()


def _wait(page, fn: str, arg=None, timeout_s: float = 60.0):
    """Poll ``fn(arg)`` in the page until truthy. (``page.wait_for_function`` evaluates strings with
    eval, which the dashboard's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        value = page.evaluate(fn, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {fn} ({arg!r})")
        time.sleep(0.2)


POINTS = "(id) => +(document.querySelector(`figure[data-chart='${id}']`)?.dataset.points || 0)"


def _points_above(page, chart: str, n: int, timeout_s: float = 60.0) -> int:
    return _wait(
        page, f"([id, n]) => {{ const p = ({POINTS})(id); return p > n ? p : 0; }}", [chart, n], timeout_s
    )


def test_browser_watches_a_job_train_and_lose_a_worker(browser, live, tmp_path):
    procs, coord, url, token, run_dir = live
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    requests: list[str] = []
    errors: list[str] = []
    page = context.new_page()
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("data:") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        r = page.goto(f"{url}/dashboard?token={token}")
        assert r.status == 200
        _wait(page, "() => document.getElementById('status').dataset.status === 'waiting'")
        assert "token" not in page.url  # the script removed it from the address bar

        faults = "slow:rank=*:seconds=0.05;kill:rank=1:step=30"
        for _ in range(2):
            procs.lepton(
                "worker",
                "--coordinator",
                url,
                "--token-file",
                run_dir / "token",
                "--threads",
                1,
                env={"LEPTON_FAULTS": faults},
            )

        before = _points_above(page, "loss", 1, timeout_s=90)
        _points_above(page, "loss", before)  # the curve grows live
        _points_above(page, "val/accuracy", 0)

        lost = page.locator("#workers tbody tr.row-lost")
        lost.wait_for(timeout=90_000)  # the killed worker
        assert lost.locator("td.state").inner_text() == "lost"
        page.locator("#events tbody tr[data-kind='worker_lost']").first.wait_for(timeout=10_000)

        m = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.text)
            for s in f.samples
        }
        assert samples[("lepton_failures_total", ())] >= 1
        assert samples[("lepton_workers", (("state", "lost"),))] == 1
        assert samples[("lepton_step", ())] >= 30 and samples[("lepton_generation", ())] >= 1
        assert ("lepton_validation_metric", (("metric", "accuracy"),)) in samples

        _points_above(page, "loss", 20)
        shot = os.environ.get("LEPTON_DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
        page.screenshot(path=shot, full_page=True)
    finally:
        context.close()
    assert coord.wait(timeout=120) == 0
    assert not errors, errors
    assert requests and all(u.startswith(url) for u in requests), [
        u for u in requests if not u.startswith(url)
    ]
