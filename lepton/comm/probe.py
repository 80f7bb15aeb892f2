"""Can every rank reach every other's data-plane address? Asked before gloo is asked to connect.

Gloo's full-mesh connect, given a peer whose advertised address cannot be reached (a worker bound to
the wrong interface, a firewall, an address behind NAT), retries until the collective timeout and then
fails on every rank alike, naming no one; the coordinator regroups the same members and the next join
fails the same way, without end (issue 26). So each rank first opens a listening socket on the address
gloo will bind (``GLOO_SOCKET_IFNAME``'s, else the one its packets to the coordinator leave from),
publishes it in the generation's store, connects to every peer's within ``PROBE_CONNECT_S`` (all at
once), and publishes the ranks it could not reach. A rank that more than half of its peers cannot
reach is the one at fault: it raises ``Unreachable`` (its worker reports the reason and exits, the
coordinator counts it lost); the others raise ``CommError`` naming it and its address (the generation
is formed again without it). With two ranks that cannot reach each other both are at fault, and the
run fails with the line that names both addresses. The probe checks the address, not gloo's own port
(which gloo picks only as it connects): a firewall that opens some ports of an address and not others
is not caught here, and gloo's timeout still bounds that case.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

from .errors import CommError, Unreachable

PROBE_CONNECT_S = 3.0  # a peer on the cluster network answers a TCP connect in milliseconds


def _reaches(address: str, timeout_s: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def probe_peers(store, rank: int, world: int, address: str, describe: str, timeout_s: float) -> None:
    """The probe of the module docstring, in the generation's ``store``; returns when every rank can
    reach every other. ``address``: where this rank's data plane binds; ``describe``: how a message
    names it (the interface)."""
    if world <= 1:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        try:
            listener.bind((address, 0))
        except OSError as e:  # not an address of this host: gloo could not bind it either
            raise Unreachable(f"cannot bind the data-plane address {address} ({describe}): {e}") from None
        listener.listen(world)
        port = listener.getsockname()[1]
        mine = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
        store.set(f"probe/addr/{rank}", mine)
        peers = [r for r in range(world) if r != rank]
        addresses = {r: store.get(f"probe/addr/{r}").decode() for r in peers}  # bounded by the store
        with ThreadPoolExecutor(max_workers=min(32, len(peers))) as pool:
            ok = dict(zip(peers, pool.map(lambda r: _reaches(addresses[r], PROBE_CONNECT_S), peers)))
        store.set(f"probe/miss/{rank}", json.dumps([r for r in peers if not ok[r]]))
        # the listener stays open until every rank has published its misses: all have probed it
        misses = {r: json.loads(store.get(f"probe/miss/{r}")) for r in range(world)}
    addresses[rank] = mine
    against = {r: [p for p, m in misses.items() if r in m] for r in range(world)}
    bad = [r for r in range(world) if len(against[r]) * 2 > world - 1]
    if not bad:
        if any(misses.values()):  # a minority cannot reach someone: gloo would still hang on it
            r = max(range(world), key=lambda x: len(against[x]))
            bad = [r]
        else:
            return
    if rank in bad:
        raise Unreachable(
            f"this worker's data-plane address {mine.rpartition(':')[0]} ({describe}) cannot be reached"
            f" from {len(against[rank])} of its {world - 1} peers within {PROBE_CONNECT_S:g} s (check"
            " --iface, the firewall, or NAT between the hosts)"
        )
    names = ", ".join(
        f"rank {r} at {addresses[r].rpartition(':')[0]} (unreachable from ranks"
        f" {', '.join(map(str, against[r]))})"
        for r in bad
    )
    raise CommError(f"data plane: {names}; the generation forms again without it")
