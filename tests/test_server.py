"""The coordinator's HTTP server, in process: its sockets and its replies (FastAPI's test client)."""

import threading
import warnings

import pytest

from fakes import make_coordinator
from lepton.coordinator.server import build_app


def test_coordinator_sockets_say_tcp_so_asyncio_disables_nagle():
    # proto 0 (socket.create_server) made uvicorn's responses wait for delayed ACKs: ~40 ms a request
    import socket

    from lepton.coordinator.server import Listener

    lis = Listener()
    try:
        assert lis.http.proto == lis.store.proto == socket.IPPROTO_TCP
    finally:
        lis.close()


@pytest.mark.parametrize("timeout_s,interval_s", [(5.0, 0.5), (2.0, 0.25)])
def test_heartbeat_interval_leaves_eight_beats_per_timeout(tmp_path, timeout_s, interval_s):
    with warnings.catch_warnings():  # starlette's note about its httpx-based test client
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    c, _ = make_coordinator(tmp_path, 2, cluster__heartbeat_timeout_s=timeout_s)
    with TestClient(build_app(c, "tok", threading.Lock(), 0, None)) as client:
        r = client.post("/v1/register", json={"host": "h", "pid": 1}, headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200 and r.json()["heartbeat_interval_s"] == interval_s
