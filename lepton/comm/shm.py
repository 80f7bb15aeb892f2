"""Allreduce through shared memory for the workers of a generation that share one host.

Why: over loopback a gloo allreduce of a 340 KB gradient costs 0.7–1.4 ms of socket copies and wake-ups
per step, a third of a step of the throughput workload on two cores. Through a shared segment the same
reduction is one copy and world-1 adds per rank (~0.1 ms). Gloo has no shared-memory transport and
torch.distributed none for CPU tensors, so this is the one collective Lepton implements itself; the
process group of the generation still exists (it carries the state broadcast and any tensor too large
for the segment).

Protocol of call ``seq`` (counted per generation, the same on every rank). The segment holds two sets
of input slots, one per rank, used by odd and even calls, and one output buffer.
1. rank r copies its tensor into its slot of set ``seq % 2`` and publishes ``arrived[r] = seq``;
2. once every rank arrived, each rank sums all input slots *in rank order* (``_reduce``), so every
   rank computes the same bits:
   - small tensors (world × bytes up to ``FULL_REDUCE_BYTES``, every gradient of the benchmarks):
     each rank reduces the whole tensor straight into its own tensor. One barrier per call.
   - large tensors: rank r reduces chunk r into the output and publishes ``reduced[r] = seq``; once
     every rank reduced, each copies the output out. Two barriers.
Why that is safe: a rank writes set ``seq % 2`` only after passing the barrier of call seq-1, i.e.
after every rank finished call seq-2, the last one that read that set; and it writes the output only
after every rank arrived at call seq, i.e. finished copying out the output of any earlier call. A rank
still reading set ``seq % 2`` holds every other rank before call seq+2.

Ordering: x86-64 keeps ordinary stores in program order, but a large copy may use non-temporal stores,
so a locked instruction (a lock round trip) drains them before each flag store; a second one after the
flag store keeps it ahead of the flag loads that decide who completes the barrier. Other architectures
use gloo (``available()``).

Waiting polls for ``SPIN_S`` (not at all when the ranks' affinities cover fewer cores than there are
ranks), then sleeps on a futex word of its own, which the rank that completes a barrier bumps and wakes.
A rank never waits forever: every few milliseconds it checks that no peer process has exited (a pidfd
per peer), that no rank abandoned the generation (a flag in the segment), the caller's
``should_abort`` (the coordinator asked for a regroup and the wait is already long) and the collective
timeout; any of them raises ``CommError``, like a failed gloo collective, unless the barrier is complete.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import select
import threading
import time
from typing import Callable, cast

import numpy as np
import torch

from .errors import CommError

SHM_DIR = "/dev/shm"
HEADER = 4096  # magic + nonce, abandoned flag, arrived[64], reduced[64], wake[64]
MAX_WORLD = 64
MAGIC = b"LEPTONSHM1"
SPIN_S = 50e-6  # poll this long, then sleep on a futex (measured: 0 and 300 µs no better)
CHECK_EVERY_S = 0.005  # liveness / abort / timeout checks while waiting
FULL_REDUCE_BYTES = 32 << 20  # up to world × tensor bytes this size every rank sums everything itself
_fence = threading.Lock()  # acquire+release = locked instructions = a full memory fence on x86
_SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 202, 0, 1  # x86-64 Linux


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# ctypes releases the GIL for the call: heartbeats go on while a rank sleeps on its futex
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_CHECK_TS = _Timespec(0, int(CHECK_EVERY_S * 1e9))


def _futex(addr: int, op: int, val: int, timeout=None) -> None:
    """FUTEX_WAIT (sleep while ``*addr == val``, at most ``timeout``) or FUTEX_WAKE (``val`` sleepers)
    on a word of the shared segment (not FUTEX_PRIVATE: the waiters are other processes)."""
    cast(ctypes.CDLL, _libc).syscall(  # None off posix, where available() is False
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_int(op),
        ctypes.c_int(val),
        timeout,
        None,
        ctypes.c_int(0),
    )


def available() -> bool:
    return (
        platform.system() == "Linux"
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.path.isdir(SHM_DIR)
        and hasattr(os, "pidfd_open")
    )


class ShmAllreduce:
    """One generation's shared segment. Build it with ``connect`` (a collective over the store)."""

    buf: mmap.mmap | None  # None once closed

    def __init__(
        self,
        buf: mmap.mmap,
        rank: int,
        world: int,
        capacity: int,
        peers: list[int],
        timeout_s: float,
        spin_s: float = SPIN_S,
        should_abort: Callable[[float], bool] | None = None,
    ):
        # the peers' pidfds first: a peer already gone raises before any view of ``buf`` exists, so
        # ``connect`` can still close the mapping (with views alive, mmap.close raises BufferError)
        self._pidfds: list[int] = []
        try:
            for p in peers:
                self._pidfds.append(os.pidfd_open(p))
        except BaseException:
            for fd in self._pidfds:
                os.close(fd)
            raise
        self.buf, self.rank, self.world, self.capacity = buf, rank, world, capacity
        self.timeout_s, self.spin_s = timeout_s, spin_s
        self.should_abort = should_abort  # given the seconds waited so far
        hdr = np.frombuffer(buf, dtype=np.int64, count=HEADER // 8)
        self._abandoned = hdr[4:5]  # after magic + nonce (bytes 0..25)
        self._arrived = hdr[8 : 8 + MAX_WORLD]
        self._reduced = hdr[8 + MAX_WORLD : 8 + 2 * MAX_WORLD]
        # one futex word per rank, bumped by the rank that completes a barrier: a waiter sleeps on its own
        self._wake = np.frombuffer(buf, dtype=np.int32, count=MAX_WORLD, offset=8 * (8 + 2 * MAX_WORLD))
        self._wake_addr = self._wake.ctypes.data
        # two sets of world input slots (calls alternate between them), then the output
        self._slots = [
            torch.frombuffer(buf, dtype=torch.uint8, count=capacity, offset=HEADER + i * capacity)
            for i in range(2 * world + 1)
        ]
        self.seq = 0
        self.work_s = 0.0  # this thread's processor time in the last call, waits excluded

    # --- set-up ----------------------------------------------------------------------------------
    @classmethod
    def connect(
        cls,
        store,
        rank: int,
        world: int,
        capacity: int,
        timeout_s: float,
        should_abort: Callable[[float], bool] | None = None,
        usable: bool = True,
    ) -> "ShmAllreduce | None":
        """Every rank of the generation calls this at the same point. Returns the segment when every
        rank could map it (they share a host, a /dev/shm and a PID namespace) and is ``usable`` (its
        tensors are in host memory; shared memory is on), else None on every rank.
        """
        capacity = -(-capacity // 64) * 64  # cache-line aligned slots
        size = HEADER + (2 * world + 1) * capacity
        ns = _pid_namespace()
        buf, err, path, nonce = None, "", "", ""
        if not usable or world > MAX_WORLD or not available():
            err = "unavailable"
        elif rank == 0:
            nonce = secrets.token_hex(8)
            path = os.path.join(SHM_DIR, f"lepton-{os.getpid()}-{nonce}")
            try:
                buf = _map(path, size, create=True)
                buf[: len(MAGIC) + 16] = MAGIC + nonce.encode()
            except OSError as e:
                err = f"cannot create {path}: {e}"
        if rank == 0:
            store.set("shm/path", f"{path} {nonce}" if buf is not None else "")
        else:
            entry = store.get("shm/path").decode()
            if not entry:
                err = err or "rank 0 has no segment"
            elif not err:
                path, nonce = entry.split()
                try:
                    buf = _map(path, size, create=False)
                    if bytes(buf[: len(MAGIC) + 16]) != MAGIC + nonce.encode():
                        err = "another host's segment"
                except OSError as e:
                    err = f"{path}: {e}"
        cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        try:
            store.set(f"shm/{rank}", f"no {err}" if err or buf is None else f"ok {os.getpid()} {ns} {cpus}")
            answers = [store.get(f"shm/{r}").decode().split() for r in range(world)]
        except BaseException:  # a peer died before answering: the store timed out
            if buf is not None:
                buf.close()
            raise
        finally:
            if rank == 0 and buf is not None:
                os.unlink(path)  # every rank mapped it, gave up or is gone: nothing left behind
        if any(a[0] != "ok" or a[2] != ns for a in answers):
            if buf is not None:
                buf.close()
            return None
        buf = cast(mmap.mmap, buf)  # every rank answered ok: this one mapped the segment
        peers = [int(a[1]) for r, a in enumerate(answers) if r != rank]
        # polling before sleeping pays only when every rank can have a core of its own; with fewer
        # cores than ranks a poll burns the time slice a peer on the same core needs to catch up
        cores = set().union(*({int(c) for c in a[3].split(",")} for a in answers))
        try:
            return cls(
                buf,
                rank,
                world,
                capacity,
                peers,
                timeout_s,
                spin_s=SPIN_S if len(cores) >= world else 0.0,
                should_abort=should_abort,
            )
        except ProcessLookupError:
            buf.close()  # no view of it exists yet (__init__ opens the pidfds first)
            raise CommError("a peer exited while the generation formed") from None

    def close(self, abandon: bool = True) -> None:
        """Leave the generation; waiting peers see ``abandoned`` and give up at once."""
        if self.buf is None:
            return
        if abandon:
            self._abandoned[0] = 1
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds = []
        # drop the views of ``buf`` (mmap.close refuses while one is alive); nothing reads them once closed
        del self._arrived, self._reduced, self._abandoned, self._wake
        self._slots = []
        try:
            self.buf.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        self.buf = None

    # --- the collective --------------------------------------------------------------------------
    def fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.is_contiguous() and t.numel() * t.element_size() <= self.capacity

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` in place (``sum`` or ``max``); the caller checked ``fits(t)``."""
        if not self.fits(t):
            raise ValueError(f"{tuple(t.shape)} {t.dtype} tensor does not fit the {self.capacity}-byte slots")
        n, nbytes = t.numel(), t.numel() * t.element_size()
        self.seq += 1
        first = (self.seq % 2) * self.world
        inputs = [s[:nbytes].view(t.dtype) for s in self._slots[first : first + self.world]]
        flat = t.view(-1)
        c0 = time.thread_time()
        inputs[self.rank].copy_(flat)
        self._publish(self._arrived)
        work = time.thread_time() - c0
        self._wait(self._arrived, "arrive")
        c0 = time.thread_time()
        if self.world * nbytes <= FULL_REDUCE_BYTES:
            # every rank reduces the whole tensor itself, straight into ``t``: one barrier per call
            _reduce(inputs, flat, op)
        else:
            # large tensors: rank r reduces chunk r into the output, then everyone copies it out
            out = self._slots[2 * self.world][:nbytes].view(t.dtype)
            lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
            if hi > lo:
                _reduce([x[lo:hi] for x in inputs], out[lo:hi], op)
            self._publish(self._reduced)
            work += time.thread_time() - c0
            self._wait(self._reduced, "reduce")
            c0 = time.thread_time()
            flat.copy_(out)
        self.work_s = work + time.thread_time() - c0
        return t

    def _publish(self, flags: np.ndarray) -> None:
        with _fence:
            pass
        flags[self.rank] = self.seq
        with _fence:  # store → load order: two ranks arriving together cannot both miss
            pass  # each other's flag, so at least one of them sees the barrier complete
        if flags[: self.world].min() < self.seq:
            return  # not the last to arrive: the last one wakes the waiters
        # the barrier is complete: wake the peers. Each waiter sleeps on its own word only while the
        # word still holds the value it read before checking the flags (FUTEX_WAIT compares atomically),
        # and the word changes after every flag is set, so no waiter sleeps through this. Waking only
        # here, not on every arrival, spares a peer that shares this core a wake-up that would find the
        # barrier still open and take the core from a rank that is computing.
        for p in range(self.world):
            if p != self.rank:
                self._wake[p] += 1
                _futex(self._wake_addr + 4 * p, _FUTEX_WAKE, 1)

    def _wait(self, flags: np.ndarray, phase: str) -> None:
        """Poll for ``spin_s`` (a peer on another core is usually almost there), then sleep on this
        rank's futex word: a waiter that shares its core with a peer must give the core away, not burn
        it. Every ``CHECK_EVERY_S`` the liveness checks run."""
        seq, w = self.seq, self.world
        if flags[:w].min() >= seq:
            return
        start = time.perf_counter()
        next_check = start + CHECK_EVERY_S
        addr = self._wake_addr + 4 * self.rank
        while True:
            word = int(self._wake[self.rank])
            if flags[:w].min() >= seq:
                return
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + CHECK_EVERY_S
                self._check(flags, now - start, phase)
            if now >= start + self.spin_s:
                _futex(addr, _FUTEX_WAIT, word, ctypes.byref(_CHECK_TS))

    def _check(self, flags: np.ndarray, waited: float, phase: str) -> None:
        """Raise if the wait can never end. Each condition is read first and the barrier tested after
        it: a peer that passed this barrier may leave (abandon, exit) at once, and that is no failure
        of a barrier that is complete."""
        abandoned = bool(self._abandoned[0])
        exited = bool(self._pidfds and select.select(self._pidfds, [], [], 0)[0])
        if flags[: self.world].min() >= self.seq:
            return
        missing = [r for r in range(self.world) if flags[r] < self.seq]
        where = f"shared-memory allreduce #{self.seq} ({phase})"
        if abandoned:
            raise CommError(f"{where}: a peer left the generation")
        if exited:
            raise CommError(f"{where}: a peer process exited")
        if self.should_abort is not None and self.should_abort(waited):
            raise CommError(
                f"{where}: the coordinator regrouped while waiting {waited:.1f} s for ranks {missing}"
            )
        if waited > self.timeout_s:
            raise CommError(f"{where}: timed out after {waited:.0f} s waiting for ranks {missing}")


def _reduce(inputs: list[torch.Tensor], out: torch.Tensor, op: str) -> None:
    """``out`` = inputs[0] ∘ inputs[1] ∘ ... in rank order: the same operations, so the same bits,
    on every rank whichever of them computes an element."""
    fn = torch.add if op == "sum" else torch.maximum
    fn(inputs[0], inputs[1], out=out)
    for x in inputs[2:]:
        fn(out, x, out=out)


def _map(path: str, size: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            # reserve the pages now: a tmpfs that is too small (a container's 64 MB /dev/shm) fails
            # here with ENOSPC, and the generation uses gloo, instead of a SIGBUS at the first write
            os.posix_fallocate(fd, 0, size)
        elif os.fstat(fd).st_size != size:
            raise OSError("size differs")
        return mmap.mmap(fd, size)
    except OSError:
        if create:
            os.unlink(path)  # nobody else knows the name yet
        raise
    finally:
        os.close(fd)


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"
