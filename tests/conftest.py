"""Shared fixtures: small data sets, job dicts, and subprocesses that are always reaped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def make_classification_csv(path: Path, rows: int = 240, features: int = 6, classes: int = 3, seed: int = 1) -> Path:
    g = np.random.default_rng(seed)
    centers = g.normal(scale=2.0, size=(classes, features))
    y = g.integers(0, classes, rows)
    x = centers[y] + g.normal(size=(rows, features))
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    lines = [",".join([f"{v:.6f}" for v in row] + [f"c{label}"]) for row, label in zip(x, y)]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def csv_data(tmp_path) -> Path:
    return make_classification_csv(tmp_path / "data.csv")


def job_dict(data_path, **over) -> dict:
    job = {
        "name": "t", "seed": 3, "task": "classification",
        "data": {"path": str(data_path), "target": "label", "split": {"train": 0.7, "val": 0.15, "test": 0.15}},
        "model": {"type": "mlp", "layers": [{"units": 16, "activation": "relu"}, {"units": 8, "activation": "tanh"}]},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": {"name": "adam", "lr": 0.01}, "log_every_steps": 5},
        "eval": {"every": "epoch"},
        "checkpoint": {"every_steps": 10, "keep": 2},
        "cluster": {"workers": 2, "heartbeat_timeout_s": 20, "collective_timeout_s": 30},
    }
    for key, value in over.items():
        node = job
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return job


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model" / "weights.safetensors"))


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)


class Procs:
    """Starts CLI subprocesses in their own session and kills every one of them at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def lepton(self, *args, env: dict | None = None, **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "lepton", *map(str, args)], start_new_session=True,
                             env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=kw.pop("cwd", REPO), **kw)
        self.procs.append(p)
        return p

    def reap(self) -> None:
        for p in self.procs:
            # the whole session, even when its leader has exited: a launcher that died leaves its
            # workers running in its process group (start_new_session makes the group id its pid)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()


def free_port() -> int:
    """A free TCP port *below* the kernel's ephemeral range: a port from that range (what binding port 0
    gives) can be handed to some outgoing connection (a worker reconnecting, say) while the test holds
    it unbound, and a connect to an unbound port of that range can even connect to itself."""
    import random
    import socket
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def expect_cli_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit 2 and one stderr line, no traceback, naming every one of ``needles``."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def first_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """``proc``'s first stdout line, or an AssertionError after ``timeout``: a bare readline would
    block the test (and the reaping of its processes) for good if the process printed nothing."""
    import queue
    import threading
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: q.put(proc.stdout.readline()), daemon=True).start()
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"{proc.args[3:5]} printed nothing in {timeout:g} s") from None


def coordinator_url(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The URL in a `lepton coordinator`'s first line."""
    import re
    line = first_line(proc, timeout)
    m = re.search(r"(http://\S+)", line)
    assert m, (line, proc.poll())
    return m.group(1)


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.reap()


def wait_for(pred, timeout: float, what: str) -> None:
    """Poll ``pred`` every 50 ms until it is true; fail the test after ``timeout`` seconds."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_cli(*args, timeout: float = 120, env: dict | None = None, cwd=REPO) -> subprocess.CompletedProcess:
    """Run ``lepton ARGS`` to completion in its own session; the whole group is killed on timeout."""
    p = subprocess.Popen([sys.executable, "-m", "lepton", *map(str, args)], start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         env={**os.environ, **(env or {})})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"lepton {' '.join(map(str, args))} timed out\n{out}\n{err}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)     # reap any worker left in the group
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
