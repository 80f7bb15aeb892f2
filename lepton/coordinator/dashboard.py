"""The coordinator's monitoring face: a web dashboard, its JSON feed, and ``/metrics`` for Prometheus.

Routes added to the control API by ``add_dashboard_routes`` (every one of them needs the job's token,
like the rest of the API but ``/healthz``):

- ``GET /dashboard?token=T``: the page. A browser cannot send a bearer header when it navigates, so
  the page takes the token once in the query string and answers with an HttpOnly cookie (named after
  a hash of the token, so that two coordinators on one host do not overwrite each other's cookie); the
  page's script then removes the token from the address bar. Later requests carry the cookie.
- ``GET /dashboard/static/{dashboard.js,dashboard.css}``: the page's assets, served from this package
  (nothing is loaded from the internet; a Content-Security-Policy forbids it).
- ``GET /dashboard/api/state``: the coordinator's status, the workers with their device, the last
  events and the job spec as YAML.
- ``GET /dashboard/api/history``: the loss, throughput and validation curves, downsampled on the
  server to at most ``MAX_POINTS`` points per series however long the run is.
- ``GET /metrics``: the Prometheus text format, from a registry of its own with one collector that
  reads the coordinator's status at scrape time.

The data routes and ``/metrics`` accept ``Authorization: Bearer T`` (scripts, Prometheus) or the cookie.
The curves come from ``metrics.jsonl``, read incrementally (each request reads only what was appended
since the previous one), so the coordinator keeps no history of its own for the dashboard.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, TypeGuard

import yaml
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..storage.rundir import METRICS_JSONL, RunDir
from .auth import cookie_name, request_authorized, same_secret, token_or_cookie_dependency
from .state import MEMBER_STATES as WORKER_STATES
from .state import PHASES

STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
MAX_POINTS = 500  # per series sent to the page
REMOTE_REFRESH_S = 5.0  # a run on object storage: how often its metrics.jsonl is read again
EVENTS_SHOWN = 200  # most recent events sent to the page
_NOT_METRICS = {"kind", "split", "time", "step", "epoch", "count", "generation", "workers", "total_steps"}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
NO_STORE = {"Cache-Control": "no-store"}


# --- downsampling ----------------------------------------------------------------------------------
class Series:
    """A curve kept in at most ``max_points`` buckets, whatever the number of points added.

    Each bucket holds the mean step and mean value of ``width`` consecutive points; when the buckets
    are full, neighbours are merged in pairs and ``width`` doubles, so memory and the size of what is
    sent stay bounded and every point still counts in a mean. A point at a step not after the last one
    (a generation that restarted from an earlier step) drops the buckets from that step on: the curve
    shows the trajectory the model actually followed."""

    def __init__(self, max_points: int = MAX_POINTS):
        self.max_points = max(2, max_points)
        self.width = 1
        self.count = 0  # points added (after rewinds)
        self._b: list[list[float]] = []  # [sum_x, sum_y, n, first_x, last_x]

    def add(self, x: float, y: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        while self._b and self._b[-1][3] >= x:  # rewind
            self.count -= int(self._b.pop()[2])
        if self._b and self._b[-1][4] >= x:  # inside the last bucket's span: cut it there
            self.count -= int(self._b.pop()[2])
        b = self._b[-1] if self._b else None
        if b is not None and b[2] < self.width:
            b[0] += x
            b[1] += y
            b[2] += 1
            b[4] = x
        else:
            self._b.append([x, y, 1, x, x])
            if len(self._b) > self.max_points:
                self._compact()
        self.count += 1

    def _compact(self) -> None:
        merged = []
        for i in range(0, len(self._b), 2):
            pair = self._b[i : i + 2]
            merged.append(
                [
                    sum(p[0] for p in pair),
                    sum(p[1] for p in pair),
                    sum(p[2] for p in pair),
                    pair[0][3],
                    pair[-1][4],
                ]
            )
        self._b = merged
        self.width *= 2

    def points(self) -> list[list[float]]:
        return [[_round(b[0] / b[2], 10), _round(b[1] / b[2])] for b in self._b]

    def __len__(self) -> int:
        return len(self._b)


def _round(v: float, digits: int = 6) -> float:
    return float(f"{v:.{digits}g}")


def downsample(points: Iterable[tuple[float, float]], max_points: int = MAX_POINTS) -> list[list[float]]:
    """``points`` (step, value) as at most ``max_points`` bucket means (see ``Series``)."""
    s = Series(max_points)
    for x, y in points:
        s.add(float(x), float(y))
    return s.points()


def _number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricsHistory:
    """The run's ``metrics.jsonl`` turned into downsampled series, read incrementally.

    Series: ``train/loss``, ``train/samples_per_s``, ``train/lr`` (train records) and ``val/<metric>``
    for every scalar of the validation records. ``last_eval[split]`` is the latest eval record of each
    split."""

    def __init__(self, run: RunDir, max_points: int = MAX_POINTS, clock=time.monotonic):
        self.run = run
        self.max_points = max_points
        self.clock = clock
        self._lock = threading.Lock()
        self._read_at: Optional[float] = None
        self._reset()

    def _reset(self) -> None:
        self._offset = 0
        self._ident: Optional[tuple[int, int]] = None
        self.series: dict[str, Series] = {}
        self.last_eval: dict[str, dict] = {}
        self.last_train: Optional[dict] = None

    def _new_bytes(self) -> bytes:
        """What metrics.jsonl gained since the last read: the tail of the local file; on other storage
        the whole object read again (at most every ``REMOTE_REFRESH_S``: its segments only grow)."""
        if not self.run.is_local:
            now = self.clock()
            if self._read_at is not None and now - self._read_at < REMOTE_REFRESH_S:
                return b""
            self._read_at = now
            try:
                data = self.run.storage.read(METRICS_JSONL)
            except FileNotFoundError:
                return b""
            if len(data) < self._offset:
                self._reset()
            return data[self._offset :]
        try:
            f = open(self.run.metrics_jsonl, "rb")
        except FileNotFoundError:
            return b""
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self._ident or st.st_size < self._offset:
                self._reset()  # a new file (or a truncated one): start over
                self._ident = (st.st_dev, st.st_ino)
            f.seek(self._offset)
            return f.read()

    def refresh(self) -> None:
        with self._lock:
            try:
                data = self._new_bytes()
            except OSError:
                return  # a store that does not answer now: the series stay as they are
            end = data.rfind(b"\n")
            if end < 0:
                return  # only a line still being written
            self._offset += end + 1
            for line in data[: end + 1].splitlines():
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(rec, dict):
                    self._add(rec)

    def _series(self, name: str) -> Series:
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = Series(self.max_points)
        return s

    def _add(self, rec: dict) -> None:
        kind, step = rec.get("kind"), rec.get("step")
        if not _number(step):
            return
        if kind == "train":
            self.last_train = rec
            for key in ("loss", "samples_per_s", "lr"):
                if _number(rec.get(key)):
                    self._series(f"train/{key}").add(float(step), float(rec[key]))
        elif kind == "eval":
            split = str(rec.get("split", "val"))
            self.last_eval[split] = rec
            if split != "val":
                return
            for key, v in rec.items():
                if key not in _NOT_METRICS and _number(v):
                    self._series(f"val/{key}").add(float(step), float(v))

    def snapshot(self) -> dict:
        self.refresh()
        with self._lock:
            return {
                "max_points": self.max_points,
                "series": {k: s.points() for k, s in self.series.items()},
                "raw_points": {k: s.count for k, s in self.series.items()},
                "last_eval": {k: _clean(v) for k, v in self.last_eval.items()},
            }

    def latest_train(self) -> Optional[dict]:
        self.refresh()
        with self._lock:
            return dict(self.last_train) if self.last_train else None

    def latest_eval(self, split: str) -> Optional[dict]:
        self.refresh()
        with self._lock:
            rec = self.last_eval.get(split)
            return dict(rec) if rec else None


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats (a diverged loss) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _device(resources: Optional[dict]) -> str:
    if not resources:
        return "-"
    gpus, memory = resources.get("gpus") or [], resources.get("gpu_memory_gb") or []
    if gpus:
        return ", ".join(
            f"{g} ({m:g} GiB)" if isinstance(m, (int, float)) else str(g)
            for g, m in zip(gpus, memory + [None] * len(gpus))
        )
    return f"cpu ×{resources.get('cpus', 1)} ({resources.get('threads', 1)} threads)"


# --- Prometheus --------------------------------------------------------------------------------------
class LeptonCollector(Collector):
    """Reads the coordinator at scrape time (under its lock) and yields the ``lepton_*`` series."""

    def __init__(self, coord, lock: threading.Lock, history: MetricsHistory):
        self.coord, self.lock, self.history = coord, lock, history

    def describe(self):
        return []  # nothing to check for clashes: this registry holds only this collector

    def collect(self):
        with self.lock:
            st = self.coord.status()
            kinds = Counter(str(e.get("kind")) for e in self.coord.events)
        val = self.history.latest_eval("val")
        test = self.history.latest_eval("test")

        def gauge(name: str, doc: str, value, labels: Optional[dict] = None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
            if labels:
                g.add_metric(list(labels.values()), _num(value))
            else:
                g.add_metric([], _num(value))
            return g

        info = GaugeMetricFamily("lepton_job_info", "The job (always 1)", labels=["name", "status"])
        info.add_metric([str(st.get("name")), str(st.get("status"))], 1)
        yield info
        phase = GaugeMetricFamily("lepton_status", "1 for the job's current status", labels=["status"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if st.get("status") == p else 0.0)
        yield phase
        yield gauge("lepton_step", "Global steps completed", st.get("step"))
        yield gauge("lepton_total_steps", "Global steps of the whole job", st.get("total_steps"))
        yield gauge("lepton_epoch", "Epochs completed", st.get("epoch"))
        yield gauge("lepton_epochs", "Epochs of the whole job", st.get("epochs"))
        yield gauge("lepton_loss", "Training loss of the last logged window", st.get("loss"))
        yield gauge(
            "lepton_samples_per_second",
            "Training throughput of the last logged window",
            st.get("samples_per_s"),
        )
        yield gauge("lepton_generation", "Current generation (membership) number", st.get("generation"))
        yield gauge(
            "lepton_learning_rate",
            "Learning rate of the last logged window",
            (self.history.latest_train() or {}).get("lr"),
        )

        workers = st.get("workers") or []
        by_state = Counter(w.get("state") for w in workers)
        g = GaugeMetricFamily("lepton_workers", "Workers by state", labels=["state"])
        for s in sorted(set(WORKER_STATES) | set(by_state)):
            g.add_metric([str(s)], by_state.get(s, 0))
        yield g
        speed = GaugeMetricFamily(
            "lepton_worker_samples_per_second", "A worker's measured throughput", labels=["worker", "host"]
        )
        share = GaugeMetricFamily(
            "lepton_worker_share", "A worker's fraction of the global batch", labels=["worker"]
        )
        step = GaugeMetricFamily(
            "lepton_worker_step", "Steps completed by a worker's replica", labels=["worker"]
        )
        seen = GaugeMetricFamily(
            "lepton_worker_last_heartbeat_seconds", "Seconds since a worker was last heard", labels=["worker"]
        )
        winfo = GaugeMetricFamily(
            "lepton_worker_info", "A worker's host and state (always 1)", labels=["worker", "host", "state"]
        )
        for w in workers:
            wid = str(w["worker_id"])
            # a worker outside the running plan (lost, standby) computes nothing and holds no share
            speed.add_metric([wid, str(w.get("host"))], _num(w.get("samples_per_s") or 0.0))
            share.add_metric([wid], _num(w.get("share_fraction") or 0.0))
            step.add_metric([wid], _num(w.get("step")))
            seen.add_metric([wid], _num(w.get("last_seen_s")))
            winfo.add_metric([wid, str(w.get("host")), str(w.get("state"))], 1)
        yield from (speed, share, step, seen, winfo)

        yield CounterMetricFamily(
            "lepton_failures", "Workers lost (worker_lost events)", kinds.get("worker_lost", 0)
        )
        ev = CounterMetricFamily("lepton_events", "Events by kind", labels=["kind"])
        for k, n in sorted(kinds.items()):
            ev.add_metric([k], n)
        yield ev

        for split, rec, name in (
            ("val", val, "lepton_validation_metric"),
            ("test", test, "lepton_test_metric"),
        ):
            m = GaugeMetricFamily(name, f"Latest {split}-split evaluation", labels=["metric"])
            for key, v in sorted((rec or {}).items()):
                if key not in _NOT_METRICS and _number(v):
                    m.add_metric([key], float(v))
            yield m
        yield gauge("lepton_validation_step", "Step of the latest validation", (val or {}).get("step"))


def _num(v) -> float:
    return float(v) if _number(v) else math.nan


# --- routes --------------------------------------------------------------------------------------------
def add_dashboard_routes(
    app: FastAPI, coord, lock: threading.Lock, token: str, max_points: int = MAX_POINTS
) -> MetricsHistory:
    """Add the dashboard, its data and ``/metrics`` to ``app``; all need ``token``."""
    cookie = cookie_name(token)
    history = MetricsHistory(coord.run, max_points)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LeptonCollector(coord, lock, history))
    job_text: list[str] = []

    require = token_or_cookie_dependency(token)  # auth.py: the bearer header or the cookie

    @app.get("/dashboard", include_in_schema=False)
    def page(request: Request) -> Response:
        query = request.query_params.get("token")
        fresh = same_secret(query, token)
        if not (fresh or request_authorized(request, token)):
            return HTMLResponse(
                _REFUSED,
                status_code=401,
                headers={"WWW-Authenticate": "Bearer", "Content-Security-Policy": CSP, **NO_STORE},
            )
        r = HTMLResponse(
            (STATIC / "dashboard.html").read_text(),
            headers={
                "Content-Security-Policy": CSP,
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
                **NO_STORE,
            },
        )
        if fresh:
            r.set_cookie(cookie, token, httponly=True, samesite="lax", path="/")
        return r

    @app.get("/dashboard/static/{name}", include_in_schema=False, dependencies=[Depends(require)])
    def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(status_code=404, detail="no such asset")
        return Response(
            (STATIC / name).read_bytes(),
            media_type=ASSETS[name],
            headers={"X-Content-Type-Options": "nosniff", **NO_STORE},
        )

    @app.get("/dashboard/api/state", dependencies=[Depends(require)])
    def state() -> JSONResponse:
        with lock:
            st = coord.status()
            events = list(coord.events[-EVENTS_SHOWN:])
            total_events = len(coord.events)
            registered = {
                e.get("worker"): e.get("resources")
                for e in coord.events
                if e.get("kind") == "worker_registered"
            }
            if not job_text:
                job_text.append(yaml.safe_dump(coord.job.to_yaml_dict(), sort_keys=False))
            batch = coord.job.train.batch_size
            task = coord.job.task
        for w in st.get("workers") or []:
            w["device"] = _device(registered.get(w["worker_id"]))
        st.update(events=events, events_total=total_events, job_yaml=job_text[0], batch_size=batch, task=task)
        return JSONResponse(_clean(st), headers=NO_STORE)

    @app.get("/dashboard/api/history", dependencies=[Depends(require)])
    def history_route() -> JSONResponse:
        return JSONResponse(history.snapshot(), headers=NO_STORE)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require)])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST, headers=NO_STORE)

    return history


_REFUSED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Lepton: token needed</title></head>
<body><h1>401: this dashboard needs the job's token</h1>
<p>Open the address that <code>lepton train</code> or <code>lepton coordinator</code> printed, or add
<code>?token=...</code> (the contents of <code>RUN_DIR/token</code>) to this URL.</p></body></html>
"""
