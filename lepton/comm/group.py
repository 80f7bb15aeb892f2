"""The reconfigurable process-group seam.

A generation is one membership with its own process group, rendezvoused in a fresh ``PrefixStore``
namespace (``gen-<id>/``) on the coordinator's TCPStore. Leaving a generation destroys the group;
joining the next one builds a new group. Everything above this module talks to it only through
``join``/``leave``/``allreduce``/``broadcast_bytes``; every collective error becomes ``CommError`` so
the worker loop can report it and wait for the next generation.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
import time
from pathlib import Path
from typing import Callable, cast

import torch
import torch.distributed as dist

from ..errors import first_line
from .errors import CommError, Unreachable
from .net import address_of, data_plane_interface, local_address_towards
from .probe import probe_peers
from .shm import ShmAllreduce


class GenerationGroup:
    def __init__(
        self,
        store_host: str,
        store_port: int,
        timeout_s: float,
        shared_memory: bool = True,
        shm_capacity: int = 1 << 20,
    ):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.shared_memory, self.shm_capacity = shared_memory, shm_capacity
        self.shm: ShmAllreduce | None = None
        # (seconds waited) -> bool, consulted by the shared-memory wait
        self.should_abort: Callable[[float], bool] | None = None
        self.work_s = 0.0  # processor time the last allreduce cost this process, waits excluded
        self.store_host, self.store_port = store_host, store_port
        self._client = dist.TCPStore(store_host, store_port, None, False, self.timeout)
        self._used = False  # the client has served a generation: the next one connects again
        self.generation: int | None = None
        self.rank = 0
        self.world = 1
        self.backend = "gloo"
        # several hosts with co-located ranks: the leaders' group, whether this rank leads its host,
        # how many hosts (1: no hierarchy)
        self._cross: dist.ProcessGroup | None = None
        self._leader, self._hosts = False, 1
        if "GLOO_SOCKET_IFNAME" not in os.environ:  # ``lepton worker --iface`` sets it
            # all peers on this host: loopback; else the interface that reaches the coordinator, not
            # the host name's address (net.py)
            iface = data_plane_interface(store_host, store_port)
            if iface:
                os.environ["GLOO_SOCKET_IFNAME"] = iface
                if iface != "lo":  # NCCL's bootstrap and its socket transport: the same interface
                    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)

    def join(self, generation: int, rank: int, world: int, store_port: int, backend: str = "gloo") -> None:
        self.leave()
        try:
            if self._used or store_port != self.store_port:
                # a new connection for each generation after the first: a restarted coordinator hosts
                # a new store, on the same port when it is fixed (``--store-port``, a Kubernetes Service)
                self._client = dist.TCPStore(self.store_host, store_port, None, False, self.timeout)
                self.store_port = store_port
            self._used = True
            store = dist.PrefixStore(f"gen-{generation}/", self._client)
            if backend == "gloo" and world > 1:
                address, describe = self._data_plane_address()
                if address is not None:
                    probe_peers(store, rank, world, address, describe, self.timeout.total_seconds())
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=self.timeout)
            if backend == "gloo" and world > 1:
                self._connect_shared_memory(store, rank, world)
        except (CommError, Unreachable):
            raise  # the probe's verdict, already in words
        except (RuntimeError, dist.DistBackendError) as e:
            raise CommError(f"joining generation {generation} failed: {e}") from e
        self.generation, self.rank, self.world, self.backend = generation, rank, world, backend

    def _data_plane_address(self) -> tuple[str | None, str]:
        """The address gloo binds and how to name it: ``GLOO_SOCKET_IFNAME``'s, else (gloo taking the
        host name's) the one this host's packets to the coordinator leave from."""
        iface = os.environ.get("GLOO_SOCKET_IFNAME")
        if iface:
            return address_of(iface), f"interface {iface}"
        try:
            return local_address_towards(self.store_host, self.store_port), "the route to the coordinator"
        except OSError:
            return None, ""

    def _connect_shared_memory(self, store, rank: int, world: int) -> None:
        """Co-located ranks reduce through a shared segment. One host: the segment is the whole
        reduction. Several hosts with co-located ranks: each host's ranks share a segment and its
        lowest rank, the leader, takes part in a gloo allreduce of the leaders (``_cross``), then shares
        the result back (``allreduce``). Either only if every rank can map its segment and wants it (a
        rank whose gradients live on a GPU does not: each rank choosing for itself would leave some in
        the segment's barrier and the others in gloo's); else gloo over everyone."""
        keys = _host_keys(store, rank, world)
        hosts = list(dict.fromkeys(keys))  # in the order of their lowest rank
        mine = [r for r in range(world) if keys[r] == keys[rank]]
        leaders = [keys.index(h) for h in hosts]
        hierarchical = 1 < len(hosts) < world
        if hierarchical:  # every rank creates the leaders' group (a collective of the whole world)
            self._cross = dist.new_group(leaders, timeout=self.timeout, backend="gloo")
        if len(hosts) == 1 or (hierarchical and len(mine) > 1):
            self.shm = ShmAllreduce.connect(
                dist.PrefixStore(f"host-{hosts.index(keys[rank])}/", store),
                mine.index(rank),
                len(mine),
                self.shm_capacity,
                self.timeout.total_seconds(),
                self.should_abort,
                usable=self.shared_memory,
            )
        if not hierarchical:
            return
        # hierarchical only if every host's segment connected (a rank alone on its host needs none)
        ok = self.shm is not None or len(mine) == 1
        store.set(f"hier/{rank}", "1" if ok else "0")
        if all(store.get(f"hier/{r}") == b"1" for r in range(world)):
            self._leader = rank in leaders
            self._hosts = len(hosts)
            return
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self._cross = None

    @property
    def transport(self) -> str:
        if self._hosts > 1:
            return f"shm+gloo ({self._hosts} hosts)"
        return "shm" if self.shm is not None else self.backend

    def leave(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self._cross, self._leader, self._hosts = None, False, 1
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass  # the group is already broken; nothing more to release
        self.generation = None

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """NCCL reduces device tensors only: a host tensor travels through the current GPU."""
        return t.cuda() if self.backend == "nccl" and not t.is_cuda else t

    def allreduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place across the generation (``sum`` or ``max``)."""
        self.work_s = 0.0
        if self.world == 1:
            return t
        if self._hosts > 1 and self._fits_hosts(t):
            return self._hierarchical(t, op)
        if self.shm is not None and self.shm.fits(t):
            self.shm.allreduce(t, op)
            self.work_s = self.shm.work_s
            return t
        c0 = time.process_time()  # gloo blocks without burning processor time while it waits
        try:
            dev = self._staged(t)
            dist.all_reduce(dev, op=_OPS[op])
            if dev is not t:
                t.copy_(dev)
        except (RuntimeError, dist.DistBackendError) as e:
            raise CommError(first_line(e)) from e
        if self.backend == "gloo":
            self.work_s = time.process_time() - c0
        return t

    def _fits_hosts(self, t: torch.Tensor) -> bool:
        """The same answer on every rank (a rank alone on its host has no segment to ask)."""
        nbytes = t.numel() * t.element_size()
        return t.device.type == "cpu" and t.is_contiguous() and nbytes <= self.shm_capacity

    def _hierarchical(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """The host's sum (shared memory), the leaders' sum of those (gloo), shared back: every rank
        ends with the same bits. The share-back is a second shared-memory reduction in which the other
        ranks give the identity (0, or -inf for max), exact in float; a leader alone on its host applies
        the same identity, so a -0.0 reads +0.0 on every host alike."""
        c0 = time.process_time()
        try:
            if self.shm is not None:
                self.shm.allreduce(t, op)
            if self._leader:
                dist.all_reduce(t, op=_OPS[op], group=self._cross)
            else:
                t.fill_(0.0 if op == "sum" else float("-inf"))
            if self.shm is not None:
                self.shm.allreduce(t, op)
            elif op == "sum":
                t.add_(0.0)
        except (RuntimeError, dist.DistBackendError) as e:
            raise CommError(first_line(e)) from e
        self.work_s = time.process_time() - c0
        return t

    def broadcast_state(self, state: dict | None, src: int) -> dict:
        """``state`` (a torch-serialisable dict, only needed on ``src``) delivered to every rank."""
        if self.world == 1:
            return cast(dict, state)  # the only rank is ``src``: it passes its state
        try:
            if self.rank == src:
                buf = io.BytesIO()
                torch.save(state, buf)
                payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
                size = torch.tensor([payload.numel()], dtype=torch.int64)
            else:
                size = torch.zeros(1, dtype=torch.int64)
            size = self._staged(size)
            dist.broadcast(size, src)
            if self.rank != src:
                payload = torch.empty(int(size.item()), dtype=torch.uint8)
            payload = self._staged(payload)
            dist.broadcast(payload, src)
            payload = payload.cpu()
        except (RuntimeError, dist.DistBackendError) as e:
            raise CommError(first_line(e)) from e
        if self.rank == src:
            return cast(dict, state)  # ``src`` passes its state
        return torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=False)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def _host_keys(store, rank: int, world: int) -> list[str]:
    """Which ranks share a host, as far as shared memory is concerned: the same boot, the same /dev/shm
    mount and the same PID namespace (a container or a namespace host has its own)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = socket.gethostname()
    try:
        st = os.stat("/dev/shm")
        shm = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm = "none"
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = "none"
    store.set(f"host/{rank}", f"{boot}/{shm}/{pid_ns}")
    return [store.get(f"host/{r}").decode() for r in range(world)]
