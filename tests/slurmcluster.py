"""A SLURM cluster of real daemons on this machine, for the tests (issue 27): munged with a key of its
own, slurmctld and one slurmd per node name (``slurmd -N NAME``; Debian's build allows several on one
host), all in the foreground as root without systemd, in a folder of their own. ``close`` cancels every
job first (stopping the daemons under a running job leaves its processes behind), then stops them.

Needs the Debian packages ``slurm-wlm`` and ``munge`` (.ci/run installs them) and root; ``require()``
skips without them, except under ``LEPTON_REQUIRE_SLURM=1`` (set by .ci/run): there it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port


def _free_range(n: int) -> int:
    """The first of ``n`` consecutive free ports below the ephemeral range."""
    for start in range(21000, 30000, 37):
        socks = []
        try:
            for port in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def require() -> None:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    why = f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)" if missing else None
    if why is None and os.geteuid() != 0:
        why = "not root (slurmd runs as root here)"
    if why:
        if os.environ.get("LEPTON_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM tests need real daemons: {why}")
        pytest.skip(f"SLURM tests need real daemons: {why}")


class SlurmCluster:
    """``nodes`` nodes ``n1..nN`` of ``cpus`` CPUs each; ``env`` points the client commands at it."""

    def __init__(self, nodes: int = 3, cpus: int = 2):
        # munged refuses a socket folder with an ancestor that is not world-executable (pytest's tmp
        # folders are 0700): a folder of our own under the system's temporary folder
        self.root = Path(tempfile.mkdtemp(prefix="lepton-slurm-"))
        self.root.chmod(0o755)
        self.procs: list[subprocess.Popen] = []
        self.nodes = [f"n{k}" for k in range(1, nodes + 1)]
        host = socket.gethostname()
        ctld = free_port()
        first = _free_range(nodes)  # slurmd ports: one consecutive range
        ports = [ctld, first, first + nodes - 1]
        sock = self.root / "munge" / "munge.socket"
        sock.parent.mkdir(mode=0o755)
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        conf = self.root / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=lepton",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={ports[0]}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock},cred_expire=5",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}/%n",
                    f"SlurmctldPidFile={self.root}/slurmctld.pid",
                    f"SlurmdPidFile={self.root}/slurmd-%n.pid",
                    f"SlurmctldLogFile={self.root / 'log'}/slurmctld.log",
                    f"SlurmdLogFile={self.root / 'log'}/slurmd-%n.log",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerParameters=sched_interval=1",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "KillWait=5",
                    "InactiveLimit=0",
                    f"NodeName={','.join(self.nodes)} NodeHostname={host} NodeAddr=127.0.0.1"
                    f" Port={ports[1]}-{ports[-1]} CPUs={cpus} State=UNKNOWN",
                    f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        key = self.root / "munge" / "munge.key"
        try:
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
            self._start(
                "munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/log/munged.log",
                f"--seed-file={self.root}/munge/seed",
            )  # fmt: skip
            self._wait(lambda: sock.exists(), 20, "munged's socket")
            self._start("slurmctld", "-D", "-i", "-f", str(conf))
            for n in self.nodes:
                (self.root / "spool" / n).mkdir()
                self._start("slurmd", "-D", "-N", n, "-f", str(conf))
            self._wait(self._idle, 60, "every node idle")
        except BaseException:
            self.close()
            raise

    def _start(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}-{len(self.procs)}.out", "ab")
        self.procs.append(
            subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        log.close()

    def _wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                    for f in (self.root / "log").iterdir()
                )
                raise AssertionError(
                    f"SLURM: no {what} ({'exited: ' + ', '.join(dead) if dead else 'timeout'})\n{logs}"
                )
            time.sleep(0.3)

    def run(self, *argv, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*map(str, argv)], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def _idle(self) -> bool:
        r = self.run("sinfo", "-h", "-o", "%T", timeout=10)
        states = r.stdout.split()
        return r.returncode == 0 and len(states) > 0 and all(s == "idle" for s in states)

    def close(self) -> None:
        try:
            self.run("scancel", "--full", "--user", "root", timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", timeout=10).stdout.strip():
                time.sleep(0.5)
        except Exception:
            pass
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
