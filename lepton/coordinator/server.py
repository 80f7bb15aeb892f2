"""The coordinator's network face: the HTTP control API (FastAPI/uvicorn) and the TCPStore.

Every endpoint except ``GET /healthz`` (and ``GET /``, a redirect to the dashboard) requires
``Authorization: Bearer <token>`` (invariant 6); heartbeat, plan and report also require the
credential of the worker they speak for (auth.py, ``WorkerCredentials``: a 403 otherwise). Every
message is validated by kind (protocol.py): a malformed one is a 422 and never reaches the controller.
The TCPStore and gloo have no authentication of their own (PyTorch's security model): the store is
bound to the same interface as the HTTP API, so bind both to the cluster's private interface.
All calls into the controller hold one lock; the controller itself never blocks.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from typing import Optional

import torch.distributed as dist
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import RedirectResponse

from ..comm.net import is_loopback
from ..protocol import (
    CREDENTIAL_HEADER,
    AnyReport,
    Heartbeat,
    HeartbeatResponse,
    PlanResponse,
    RegisterRequest,
    RegisterResponse,
)
from .auth import WorkerCredentials, bearer_dependency, not_this_worker
from .controller import Controller
from .dashboard import add_dashboard_routes
from .files import add_file_routes
from .tls import ServerTls

HEARTBEAT_INTERVAL_S = 0.5
# at least this many beats per cluster.heartbeat_timeout_s, whatever the timeout (a short one beats faster)
BEATS_PER_TIMEOUT = 8


def build_app(
    coord: Controller,
    token: str,
    lock: threading.Lock,
    store_port: int,
    factory_pickle: str | None,
    credentials: WorkerCredentials | None = None,
) -> FastAPI:
    """``credentials``: default, from the run directory's key (``RunDir.worker_key``)."""
    # no OpenAPI schema or docs pages: they would answer without the token (and list every route);
    # the tests build the schema from the app (``app.openapi()``) and fuzz the live server with it
    app = FastAPI(title="Lepton coordinator", docs_url=None, redoc_url=None, openapi_url=None)
    creds = credentials or WorkerCredentials(coord.run.worker_key())

    # async: FastAPI runs a plain ``def`` dependency or endpoint on a thread of its pool, which costs
    # ~0.3 ms of processor time per request (measured: 0.70 ms per heartbeat with threads, 0.45 without)
    # and training workers pay for it when the coordinator shares their cores. The hot endpoints
    # (heartbeat, plan, report) are async: the controller never waits on anything but a few small file
    # writes, so they hold the event loop no longer than they would hold the lock; the rare heavier
    # ones (register, status, the dashboard) stay on the pool.
    auth = bearer_dependency(token)  # async (auth.py)

    def check_worker(worker_id: str, credential: Optional[str]) -> None:
        if not creds.verify(worker_id, credential):
            raise not_this_worker(worker_id)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        # no secret in the redirect: the dashboard asks for the token (or has its cookie)
        return RedirectResponse("/dashboard", status_code=307)

    @app.post("/v1/register", dependencies=[Depends(auth)])
    def register(req: RegisterRequest, request: Request) -> RegisterResponse:
        peer = request.client.host if request.client else None
        if req.data_address and is_loopback(req.data_address) and peer and not is_loopback(peer):
            # its peers would connect to their own loopback: the generation could never form
            raise HTTPException(
                422,
                f"worker on {req.host}: its data plane would bind {req.data_address} (loopback), which"
                f" workers on other hosts cannot reach; it reaches the coordinator from {peer}: give"
                " lepton worker --iface the interface of that address, or unset GLOO_SOCKET_IFNAME",
            )
        with lock:
            wid = coord.register(req)
            job = coord.job.to_yaml_dict()
        return RegisterResponse(
            worker_id=wid,
            credential=creds.issue(wid),
            job=job,
            run_dir=coord.run.where(),  # a path on this host, or a URL
            store_port=store_port,
            factory_pickle=factory_pickle,
            heartbeat_interval_s=min(
                HEARTBEAT_INTERVAL_S, coord.job.cluster.heartbeat_timeout_s / BEATS_PER_TIMEOUT
            ),
        )

    @app.post("/v1/heartbeat", dependencies=[Depends(auth)])
    async def heartbeat(
        hb: Heartbeat, credential: Optional[str] = Header(default=None, alias=CREDENTIAL_HEADER)
    ) -> HeartbeatResponse:
        check_worker(hb.worker_id, credential)
        with lock:
            return coord.heartbeat(hb)

    @app.get("/v1/plan", dependencies=[Depends(auth)])
    async def plan(
        worker_id: str = Query(max_length=128),
        credential: Optional[str] = Header(default=None, alias=CREDENTIAL_HEADER),
    ) -> PlanResponse:
        check_worker(worker_id, credential)
        with lock:
            reply = coord.plan(worker_id)
        if reply.generation is not None:
            reply.generation.store_port = store_port
        return reply

    @app.post("/v1/report", dependencies=[Depends(auth)])
    async def report(
        r: AnyReport, credential: Optional[str] = Header(default=None, alias=CREDENTIAL_HEADER)
    ) -> dict:
        check_worker(r.worker_id, credential)
        with lock:
            coord.report(r)
        return {"ok": True}

    @app.get("/v1/status", dependencies=[Depends(auth)])
    def status() -> dict:
        with lock:
            return coord.status()

    add_dashboard_routes(app, coord, lock, token)  # /dashboard, /dashboard/api/*, /metrics

    # the run directory for workers that cannot see it (files.py); the spools go with the server
    def write_refused(worker_id: str) -> Optional[str]:
        with lock:
            return coord.write_refused(worker_id)

    app.state.uploads = add_file_routes(app, coord.run, auth, check_worker, write_refused)
    return app


def _listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose ``proto`` is IPPROTO_TCP (``socket.create_server`` leaves 0):
    asyncio sets TCP_NODELAY only on connections whose proto says TCP, and without it uvicorn's
    two-part responses wait on the client's delayed ACK, 40 ms per request when requests come less
    than ~40 ms apart (measured: heartbeats took 42-58 ms while training, 1.5-10 ms with this)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(1024)
    except OSError:
        s.close()
        raise
    return s


class Listener:
    """The coordinator's two listening sockets (HTTP API and TCPStore) on one interface.

    Bound before the coordinator exists, so that ``lepton train`` can start its workers (which spend
    a second or more importing torch) while the data is still being prepared: their connections wait
    in the listen backlog until the server starts answering."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, store_port: int = 0, advertise: str | None = None
    ):
        self.host = host
        self.advertise = advertise  # the name workers use (a Service's DNS name), if not ``host``
        self.scheme = "http"  # https once a CoordinatorServer serves TLS on it
        self.http = _listen_tcp(host, port)
        try:
            self.store = _listen_tcp(host, store_port)
        except OSError:
            self.http.close()
            raise
        self.port = self.http.getsockname()[1]
        self.store_port = self.store.getsockname()[1]

    @property
    def public_host(self) -> str:
        """The host in the URL and the server certificate: ``advertise``, else the bound address."""
        return self.advertise or self.host

    @property
    def url(self) -> str:
        host = self.public_host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def close(self) -> None:
        self.http.close()
        self.store.close()


class CoordinatorServer:
    """Serves ``coord`` on a ``Listener``: the HTTP API on a thread, the TCPStore, a ticker thread."""

    def __init__(
        self,
        coord: Controller,
        token: str,
        listener: Listener,
        factory_pickle: str | None = None,
        tls: ServerTls | None = None,
    ):
        self.coord = coord
        self.lock = threading.Lock()
        self.listener = listener
        # the store listens on the socket we bound, so it is on the same interface as the API
        self.store: dist.TCPStore | None = dist.TCPStore(
            listener.host,
            listener.store_port,
            None,
            True,
            datetime.timedelta(seconds=60),
            wait_for_workers=False,
            master_listen_fd=listener.store.fileno(),
        )
        # the store owns the descriptor from now on (its destructor closes it): the socket object lets
        # go of it, or closing both would close whatever file took the number in between
        listener.store.detach()
        app = self._app = build_app(coord, token, self.lock, listener.store_port, factory_pickle)
        self.tls = tls
        if tls:
            listener.scheme = "https"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=str(tls.certfile) if tls else None,
            ssl_keyfile=str(tls.keyfile) if tls else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener.http]}, name="lepton-http", daemon=True
        )
        self._ticker = threading.Thread(target=self._tick_loop, name="lepton-tick", daemon=True)
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return self.listener.url

    def start(self) -> "CoordinatorServer":
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._thread.start()
        self._ticker.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the coordinator's HTTP server did not start")
            time.sleep(0.01)
        return self

    def _tick_loop(self) -> None:
        while not self._stopping.wait(0.2):
            with self.lock:
                self.coord.tick()

    def wait(self, poll_s: float = 0.2, on_poll=None) -> None:
        """Block until the job reaches a final phase; ``on_poll(status)`` e.g. drives a progress bar."""
        while True:
            with self.lock:
                final = self.coord.phase.final
                snapshot = self.coord.status() if on_poll else None
            if on_poll:
                on_poll(snapshot)
            if final:
                return
            time.sleep(poll_s)

    def stop(self, linger_s: float = 0.0) -> None:
        """Stop serving; ``linger_s`` leaves remote workers time to hear 'exit' from their next poll."""
        if linger_s:
            time.sleep(linger_s)
        self._stopping.set()
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self.listener.close()
        self._app.state.uploads.close()
        self.store = None  # closes the store's listening socket
