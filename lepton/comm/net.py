"""Which interface the data plane binds: the one whose route reaches the coordinator.

Gloo, left to itself, binds the address its host name resolves to; in containers and on hosts whose
name is not in DNS that is 127.0.0.1 or an address the peers cannot reach, and the peers retry the
connection until the collective timeout (issue 26). The address a worker's own connection to the
coordinator leaves from is, by construction, one that the cluster routes: the workers bind there.
``--iface`` (``GLOO_SOCKET_IFNAME``) overrides it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


def local_address_towards(host: str, port: int) -> str:
    """The local address this host's packets to ``host`` leave from (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port or 9))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the interface that holds the IPv4 ``address``; None if none does (or IPv6)."""
    try:
        if ipaddress.ip_address(address).version != 4:
            return None
    except ValueError:
        return None
    for _, name in socket.if_nameindex():
        if address_of(name) == address:  # None: down, or no IPv4 address
            return name
    return None


def address_of(interface: str) -> str | None:
    """The IPv4 address of ``interface``; None if it has none (or does not exist)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = struct.pack("256s", interface.encode()[:15])
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
        except OSError:
            return None


def data_plane_interface(coordinator_host: str, port: int) -> str | None:
    """The interface gloo will bind for a coordinator at ``coordinator_host``: ``GLOO_SOCKET_IFNAME``
    when set (``lepton worker --iface``), loopback when the coordinator is on this host, else the one
    whose route reaches it."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    if coordinator_host in ("127.0.0.1", "localhost", "::1"):
        return "lo"
    return interface_towards(coordinator_host, port)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def interface_towards(host: str, port: int) -> str | None:
    """The interface whose route reaches ``host``: what gloo binds (``GLOO_SOCKET_IFNAME``)."""
    try:
        return interface_of(local_address_towards(host, port))
    except OSError:  # no route: leave gloo to its default, the join's error will say more
        return None
