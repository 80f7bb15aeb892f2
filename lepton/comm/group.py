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
import time
from typing import Callable, cast

import torch
import torch.distributed as dist

from ..errors import first_line
from .errors import CommError
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
        self.generation: int | None = None
        self.rank = 0
        self.world = 1
        self.backend = "gloo"
        if store_host in ("127.0.0.1", "localhost", "::1") and "GLOO_SOCKET_IFNAME" not in os.environ:
            # all peers are on this host: keep gloo on loopback instead of the hostname's address
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"

    def join(self, generation: int, rank: int, world: int, store_port: int, backend: str = "gloo") -> None:
        self.leave()
        if store_port != self.store_port:  # a restarted coordinator hosts a new store
            self._client = dist.TCPStore(self.store_host, store_port, None, False, self.timeout)
            self.store_port = store_port
        store = dist.PrefixStore(f"gen-{generation}/", self._client)
        try:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=self.timeout)
            if backend == "gloo" and world > 1:
                # co-located ranks reduce through a shared segment; None unless every rank can map it
                # and wants it (a rank whose gradients live on a GPU does not: each rank choosing for
                # itself would leave some in the segment's barrier and the others in gloo's)
                self.shm = ShmAllreduce.connect(
                    store,
                    rank,
                    world,
                    self.shm_capacity,
                    self.timeout.total_seconds(),
                    self.should_abort,
                    usable=self.shared_memory,
                )
        except (RuntimeError, dist.DistBackendError) as e:
            raise CommError(f"joining generation {generation} failed: {e}") from e
        self.generation, self.rank, self.world, self.backend = generation, rank, world, backend

    @property
    def transport(self) -> str:
        return "shm" if self.shm is not None else self.backend

    def leave(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
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
        if self.shm is not None and self.shm.fits(t):
            self.shm.allreduce(t, op)
            self.work_s = self.shm.work_s
            return t
        c0 = time.process_time()  # gloo blocks without burning processor time while it waits
        try:
            dev = self._staged(t)
            dist.all_reduce(dev, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
            if dev is not t:
                t.copy_(dev)
        except (RuntimeError, dist.DistBackendError) as e:
            raise CommError(first_line(e)) from e
        if self.backend == "gloo":
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
