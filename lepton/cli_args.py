"""Argument types and parsers shared by the ``lepton`` subcommands (``lepton.cli`` and
``lepton.export.cli``): counts, CPU lists, HOST:PORT. A leaf: it imports only ``lepton.errors``, so
both command modules can use it without importing each other."""

from __future__ import annotations

import os

from .errors import LeptonError


def positive(text: str) -> int:
    """argparse type: a count (workers, threads); argparse turns the ValueError into a usage error."""
    n = int(text)
    if n < 1:
        raise ValueError(text)
    return n


positive.__name__ = (
    "positive integer"  # argparse names the type in its message: "invalid positive integer value"
)


def cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            span = range(int(lo), int(hi or lo) + 1)
            if not span or span.start < 0:
                raise ValueError(part)
            out += list(span)
    except ValueError:
        raise LeptonError(f"--cpus {text!r}: expected core numbers like 0 or 0,1 or 0-3") from None
    cores = set(range(os.cpu_count() or 1))
    if not set(out) <= cores:
        raise LeptonError(
            f"--cpus {text!r}: no core(s) {sorted(set(out) - cores)} on this machine"
            f" (it has {_ranges(sorted(cores))})"
        )
    return out


def _ranges(cores: list[int]) -> str:
    """0,1,2,3,6 -> '0-3,6'"""
    spans: list[list[int]] = []
    for c in cores:
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def split_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise LeptonError(f"--bind {bind!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
    if int(port) > 65535:  # the socket layer would raise OverflowError, not a message
        raise LeptonError(f"--bind {bind!r}: port {int(port)} is out of range (0-65535; 0 picks a free port)")
    return host.strip("[]") or "127.0.0.1", int(port)
