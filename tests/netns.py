"""Hosts made of Linux namespaces on this machine, for the multi-host tests (issue 26).

Each host is a network namespace with one veth link to a bridge in the root namespace (10.213.T.K/24,
T from the harness's tag), so hosts reach each other only over that network. A command runs on a host
in a mount and UTS namespace of its own as well: a private ``/dev/shm`` (no shared-memory reduction
with another host's workers), the folders in ``hide`` covered by an empty tmpfs (it cannot see the
coordinator's run directory or the data), and a host name that resolves nowhere (gloo cannot take
its address from DNS). Cutting a host's link is ``ip link set ... down`` on the bridge side.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2. ``require()`` skips when they are missing,
except where ``LEPTON_REQUIRE_NETNS=1`` (set by .ci/run): there it fails.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kill_session

REPO = Path(__file__).resolve().parents[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def require() -> None:
    """Skip (or fail, under LEPTON_REQUIRE_NETNS=1) when namespaces cannot be made here."""
    why = None
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        why = "iproute2/util-linux missing (ip, unshare)"
    elif os.geteuid() != 0:
        why = "not root"
    else:
        name = f"lprobe{secrets.token_hex(3)}"
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            why = f"cannot create a network namespace: {r.stderr.strip()}"
        else:
            _ip("netns", "del", name, check=False)
    if why:
        if os.environ.get("LEPTON_REQUIRE_NETNS") == "1":
            pytest.fail(f"multi-host tests need network namespaces: {why}")
        pytest.skip(f"multi-host tests need network namespaces: {why}")


class Hosts:
    """``n`` hosts on one bridge; ``close`` removes every namespace and link it made."""

    def __init__(self, n: int):
        self.tag = secrets.token_hex(2)
        self.subnet = 16 + int(self.tag, 16) % 224
        self.bridge = f"lb{self.tag}"
        self.names = [f"l{self.tag}h{k}" for k in range(n)]
        self.links = [f"lv{self.tag}{k}" for k in range(n)]  # the bridge side of each host's veth
        self.procs: list[subprocess.Popen] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for k, (ns, link) in enumerate(zip(self.names, self.links)):
                _ip("netns", "add", ns)
                _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", link, "master", self.bridge, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def address(self, k: int) -> str:
        return f"10.213.{self.subnet}.{k + 1}"

    def add_interface(self, k: int, name: str, address: str) -> None:
        """A second interface on host ``k`` holding ``address``, which no other host routes to: a worker
        told to bind it (``--iface``) is unreachable on the data plane. A veth pair whose both ends stay
        in the host (this kernel may have no ``dummy`` driver)."""
        ns = self.names[k]
        _ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", name)
        _ip("-n", ns, "link", "set", f"{name}p", "up")
        _ip("-n", ns, "link", "set", name, "up")

    def attach_this_machine(self) -> str:
        """An address for the root namespace on the bridge (``.254``), so a service run by the test
        itself (the S3 server) is one more host on the hosts' network; returns it."""
        address = f"10.213.{self.subnet}.254"
        _ip("addr", "add", f"{address}/24", "dev", self.bridge)
        return address

    def popen(
        self,
        k: int,
        argv: list[str],
        *,
        hide: list[Path] = (),  # type: ignore[assignment]
        env: dict | None = None,
        log: Path,
    ) -> subprocess.Popen:
        """``argv`` on host ``k``, in its own session, output to ``log``."""
        covers = "".join(f"mount -t tmpfs tmpfs {shlex.quote(str(d))}; " for d in hide)
        script = (
            f"hostname {self.names[k]}-nodns; mount -t tmpfs tmpfs /dev/shm; {covers}exec {shlex.join(argv)}"
        )
        out = open(log, "ab")
        p = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.names[k],
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        out.close()
        self.procs.append(p)
        return p

    def lepton(self, k: int, *args, **kw) -> subprocess.Popen:
        return self.popen(k, [sys.executable, "-m", "lepton", *map(str, args)], **kw)

    def lepton_many(self, k: int, n: int, *args, logs: list[Path], **kw) -> subprocess.Popen:
        """``n`` copies of ``lepton ARGS`` on host ``k``, in one mount namespace (so they share its
        /dev/shm, as processes of one host do), each with its log; exits 0 when every one did."""
        cmd = shlex.join([sys.executable, "-m", "lepton", *map(str, args)])
        starts = " ".join(f'{cmd} >>{shlex.quote(str(log))} 2>&1 & pids="$pids $!";' for log in logs[:n])
        script = f"pids=; {starts} rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"
        return self.popen(k, ["sh", "-c", script], **kw)

    def shape(self, rate: str, delay: str = "0.1ms") -> str:
        """Every host's egress limited to ``rate`` (e.g. 1gbit) with ``delay`` one way, by netem; where
        the kernel has no netem (sch_netem), by tbf, the rate alone. Returns what was applied."""
        bits = float(rate.rstrip("gmkbit") or 0) * {"g": 1e9, "m": 1e6, "k": 1e3}.get(
            rate.rstrip("bit")[-1:], 1
        )
        burst = max(
            64_000, int(bits / 8 / 250)
        )  # a tick's worth at HZ=250: tbf cannot reach the rate below it
        for qdisc, applied in (
            (["netem", "rate", rate, "delay", delay], f"netem rate {rate} delay {delay}"),
            (
                ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"],
                f"tbf rate {rate} (no netem: no delay)",
            ),
        ):
            ok = all(
                subprocess.run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", *qdisc],
                    capture_output=True, timeout=20,
                ).returncode == 0
                for ns in self.names
            )  # fmt: skip
            if ok:
                return applied
        raise RuntimeError(f"cannot shape the links to {rate} (neither netem nor tbf)")

    def cut(self, k: int) -> None:
        """Host ``k``'s link down: its packets go nowhere, its processes live on."""
        _ip("link", "set", self.links[k], "down")

    def uncut(self, k: int) -> None:
        _ip("link", "set", self.links[k], "up")

    def close(self) -> None:
        for p in self.procs:
            kill_session(p)
        for ns in self.names:
            _ip("netns", "del", ns, check=False)  # takes its end of the veth, and so the pair
        _ip("link", "del", self.bridge, check=False)
