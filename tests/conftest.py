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


def make_classification_csv(
    path: Path, rows: int = 240, features: int = 6, classes: int = 3, seed: int = 1
) -> Path:
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
        "name": "t",
        "seed": 3,
        "task": "classification",
        "data": {
            "path": str(data_path),
            "target": "label",
            "split": {"train": 0.7, "val": 0.15, "test": 0.15},
        },
        "model": {
            "type": "mlp",
            "layers": [{"units": 16, "activation": "relu"}, {"units": 8, "activation": "tanh"}],
        },
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "optimizer": {"name": "adam", "lr": 0.01},
            "log_every_steps": 5,
        },
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


def kill_session(p: subprocess.Popen) -> None:
    """SIGKILL ``p``'s whole session and wait for ``p`` (10 s at most). The whole session, even when its
    leader has exited: a launcher that died leaves its workers running in its process group
    (start_new_session makes the group id its pid)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Procs:
    """Starts CLI subprocesses in their own session and kills every one of them at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def lepton(self, *args, env: dict | None = None, **kw) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-m", "lepton", *map(str, args)],
            start_new_session=True,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=kw.pop("cwd", REPO),
            **kw,
        )
        self.procs.append(p)
        return p

    def reap(self) -> None:
        for p in self.procs:
            kill_session(p)
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
    m = re.search(r"(https?://\S+)", line)
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
    p = subprocess.Popen(
        [sys.executable, "-m", "lepton", *map(str, args)],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"lepton {' '.join(map(str, args))} timed out\n{out}\n{err}") from None
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # reap any worker left in the group
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# --- tiers: a test that starts processes is `e2e`; everything else is the fast tier ------------------
# `make test-fast` runs `pytest -m "not e2e"`. The rule is automatic: a test is e2e when it, a fixture of
# the test modules it uses, or a function of the test modules either of them calls (conftest's run_cli and
# Procs, a module's own helpers; transitively) refers to one of E2E_ENTRY_POINTS. A test may also say so
# itself with @pytest.mark.e2e. The autouse guard below makes a miss loud: a fast-tier test that starts a
# process fails.
E2E_ENTRY_POINTS = (
    "subprocess",
    "multiprocessing",
    "torch.multiprocessing",
    "playwright",
    "uvicorn",
    "lepton.train",  # a real coordinator server and K worker processes
    "lepton.launch.local.LocalWorkers",
    "lepton.coordinator.server.CoordinatorServer",
    "lepton.launch.start_coordinator",
)  # public paths: each is also matched under the name of the module that defines it (lepton.api.train)
_TEST_MODULES = ("conftest", "fakes", "factory_models")


def _in_tests(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module in _TEST_MODULES or module.startswith("test_")


def _qualified(obj) -> str | None:
    import inspect

    if inspect.ismodule(obj):
        return obj.__name__
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else None


_entry_point_names: tuple[str, ...] = ()


def _is_entry_point(name: str | None) -> bool:
    global _entry_point_names
    if not _entry_point_names:  # the listed paths and where their objects are defined; a stale path is
        import importlib  # skipped (and the guard catches the test that then starts a process)

        names = set(E2E_ENTRY_POINTS)
        for path in E2E_ENTRY_POINTS:
            module, _, attr = path.rpartition(".")
            try:
                names.add(_qualified(getattr(importlib.import_module(module), attr)) or path)
            except (ImportError, AttributeError, ValueError):
                pass
        _entry_point_names = tuple(names)
    return name is not None and any(name == e or name.startswith(e + ".") for e in _entry_point_names)


def _dotted(node) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything that is not a dotted name."""
    import ast

    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _resolve(parts: list[str], scope: dict, imports: dict[str, str]):
    """(qualified name, object or None) of the dotted name ``parts`` as the function sees it."""
    if parts[0] in imports:  # imported inside the function
        target = imports[parts[0]]
        module, _, name = target.rpartition(".")
        obj = sys.modules.get(target) or getattr(sys.modules.get(module), name, None)
        if obj is None:
            return ".".join([target, *parts[1:]]), None
    elif parts[0] in scope:
        obj = scope[parts[0]]
    else:
        return None, None
    for i, attr in enumerate(parts[1:], 1):
        nxt = getattr(obj, attr, None)
        if nxt is None:
            return ".".join([_qualified(obj) or "?", *parts[i:]]), None
        obj = nxt
    return _qualified(obj), obj


_starts_processes_memo: dict[int, bool] = {}


def _starts_processes(fn) -> bool:
    """Whether the source of ``fn`` (a function or class of the test modules) refers to an entry point,
    directly or through another function or class of the test modules."""
    import ast
    import inspect
    import textwrap

    if id(fn) in _starts_processes_memo:
        return _starts_processes_memo[id(fn)]
    _starts_processes_memo[id(fn)] = False  # while recursing, and for unreadable source
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    scope = getattr(fn, "__globals__", None) or vars(inspect.getmodule(fn))
    imports: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imports[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                imports[a.asname or a.name] = f"{node.module}.{a.name}"
    found = any(_is_entry_point(target) for target in imports.values())
    for node in ast.walk(tree):
        if found:
            break
        parts = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if parts:
            name, obj = _resolve(parts, scope, imports)
            found = _is_entry_point(name) or (
                (inspect.isfunction(obj) or inspect.isclass(obj))
                and _in_tests(obj)
                and _starts_processes(obj)
            )
    _starts_processes_memo[id(fn)] = found
    return found


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        if item.get_closest_marker("e2e"):
            continue
        fns = [getattr(item, "function", None)]
        for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
            fns += [inspect.unwrap(d.func) for d in defs]
        if any(fn is not None and fn is not _guard and _in_tests(fn) and _starts_processes(fn) for fn in fns):
            item.add_marker(pytest.mark.e2e)


def _guard(request, monkeypatch):
    """Outside `e2e`, starting a process is a test error: the fast tier stays fast and self-contained."""
    if request.node.get_closest_marker("e2e") is None:
        import multiprocessing.process

        def refuse(*args, **kwargs):
            raise RuntimeError(
                f"{request.node.nodeid} starts a process but is not marked e2e: mark it "
                "@pytest.mark.e2e, or add its entry point to conftest.E2E_ENTRY_POINTS"
            )

        for owner, name in (
            (subprocess.Popen, "_execute_child"),
            (multiprocessing.process.BaseProcess, "start"),
            (os, "fork"),
            (os, "forkpty"),
            (os, "posix_spawn"),
            (os, "posix_spawnp"),
            (os, "system"),
        ):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, refuse)
    yield


_fast_tier_starts_no_process = pytest.fixture(autouse=True)(_guard)
