"""The data-plane probe (comm/probe.py): ranks as threads of this process on a real TCPStore and real
sockets on loopback; the unreachable peer is made by refusing connections to one rank's address (on
real networks: tests/test_multihost.py, an interface no other host routes to)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from lepton.comm import probe
from lepton.comm.errors import CommError, Unreachable

pytestmark = pytest.mark.timeout(60)


def _run(world: int, monkeypatch, unreachable_rank: int | None = None) -> dict[int, BaseException | None]:
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=20), wait_for_workers=False)
    real = probe._reaches
    reader = dist.PrefixStore(
        "gen-0/", dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=20))
    )
    lock = threading.Lock()  # one store client, asked from many threads

    def reaches(address: str, timeout_s: float) -> bool:
        if unreachable_rank is not None:
            with lock:
                bad = reader.get(f"probe/addr/{unreachable_rank}").decode()
            if bad == address:
                return False  # as a connect to an address no route leads to
        return real(address, timeout_s)

    monkeypatch.setattr(probe, "_reaches", reaches)
    out: dict[int, BaseException | None] = {}

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", server.port, None, False, timedelta(seconds=20))
        try:
            probe.probe_peers(dist.PrefixStore("gen-0/", client), r, world, "127.0.0.1", "interface lo", 20.0)
            out[r] = None
        except Exception as e:  # the thread's outcome is the test's
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(not t.is_alive() for t in threads)
    return out


def test_ranks_that_all_reach_each_other_pass(monkeypatch):
    assert _run(3, monkeypatch) == {0: None, 1: None, 2: None}


def test_the_unreachable_rank_stops_with_its_address_and_the_others_name_it(monkeypatch):
    out = _run(3, monkeypatch, unreachable_rank=2)
    assert isinstance(out[2], Unreachable), out
    assert "127.0.0.1 (interface lo) cannot be reached from 2 of its 2 peers" in str(out[2])
    for r in (0, 1):
        assert isinstance(out[r], CommError), out
        assert "rank 2 at 127.0.0.1 (unreachable from ranks 0, 1)" in str(out[r])
