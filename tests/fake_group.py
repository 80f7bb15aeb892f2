"""An in-process stand-in for ``lepton.comm.GenerationGroup``: ranks are threads of one process.

``FakeCluster`` plays the coordinator's store: ``cluster.group()`` makes one rank's group, and
``join(generation, rank, world, ...)`` meets the other ranks of that generation in a shared
``FakeWorld``. Collectives are exact and deterministic: an allreduce sums (or takes the max of) the
ranks' tensors in rank order, once, and every rank copies the same result; ``broadcast_state``
hands every rank a serialised copy of ``src``'s state, as the real group does.

Errors are ``CommError``, as the real group's: ``cluster.fail_at(rank, allreduce=k)`` makes that
rank's k-th allreduce of a generation (0-based, counted from its join) raise, and breaks the world so
that its peers' pending and later collectives raise too: a peer that died. A Trainer step without
global BatchNorm is one allreduce, and the first step of a generation is preceded only by the state
broadcast, so ``allreduce=k`` fails the generation's (k+1)-th step while evaluations add calls.

Limit: keyed dropout's pass state is process-wide (lepton/worker/dropout.py), so models run by
several fake ranks at once must not have dropout layers.
"""

from __future__ import annotations

import io
import threading

import torch

from lepton.comm import CommError


class FakeWorld:
    """The ranks of one generation: where their tensors meet."""

    def __init__(self, world: int, timeout_s: float):
        self.world = world
        self._barrier = threading.Barrier(world, action=self._combine, timeout=timeout_s)
        self._inputs: list = [None] * world
        self._result = None
        self.broken_by: str | None = None

    def _combine(self) -> None:  # run by one thread once every rank has arrived
        ops = {op for _, op in self._inputs}
        if len(ops) != 1:
            self.broken_by = f"ranks disagree on the collective: {sorted(ops)}"
            raise RuntimeError(self.broken_by)
        op = ops.pop()
        values = [value for value, _ in self._inputs]
        if op == "broadcast":
            self._result = next(value for value in values if value is not None)
            return
        result = values[0].clone()
        for value in values[1:]:
            if op == "sum":
                result += value
            else:
                torch.maximum(result, value, out=result)
        self._result = result

    def meet(self, rank: int, value, op: str):
        """Deposit this rank's value, wait for the others, return the combined result."""
        if self.broken_by is not None:
            raise CommError(f"the group is broken: {self.broken_by}")
        self._inputs[rank] = (value, op)
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise CommError(f"a peer left the collective: {self.broken_by or 'timed out'}") from None
        return self._result

    def break_(self, why: str) -> None:
        self.broken_by = why
        self._barrier.abort()


class FakeCluster:
    """The generations' meeting place and the fault plan, shared by every rank's ``FakeGroup``."""

    def __init__(self, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._worlds: dict[int, FakeWorld] = {}
        self._faults: set[tuple[int, int]] = set()  # (rank, allreduce index)

    def group(self) -> FakeGroup:
        return FakeGroup(self)

    def fail_at(self, rank: int, allreduce: int) -> None:
        self._faults.add((rank, allreduce))

    def should_fail(self, rank: int, allreduce: int) -> bool:
        return (rank, allreduce) in self._faults

    def world(self, generation: int, world: int) -> FakeWorld:
        with self._lock:
            if generation not in self._worlds:
                self._worlds[generation] = FakeWorld(world, self.timeout_s)
            found = self._worlds[generation]
        if found.world != world:
            raise CommError(f"generation {generation} has {found.world} ranks, not {world}")
        return found


class FakeGroup:
    """One rank's view, with the interface of ``GenerationGroup`` that the worker uses."""

    def __init__(self, cluster: FakeCluster | None = None):
        self.cluster = cluster or FakeCluster()
        self.should_abort = None
        self.work_s = 0.0
        self.generation: int | None = None
        self.rank = 0
        self.world = 1
        self.backend = "gloo"
        self.allreduces = 0  # this generation's allreduce calls so far
        self._world: FakeWorld | None = None

    @property
    def transport(self) -> str:
        return "fake"

    def join(
        self, generation: int, rank: int, world: int, store_port: int = 0, backend: str = "gloo"
    ) -> None:
        self.leave()
        self._world = self.cluster.world(generation, world) if world > 1 else None
        self.generation, self.rank, self.world, self.backend = generation, rank, world, backend
        self.allreduces = 0

    def leave(self) -> None:
        self._world = None
        self.generation = None

    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.work_s = 0.0
        call, self.allreduces = self.allreduces, self.allreduces + 1
        if self.cluster.should_fail(self.rank, call):
            why = f"rank {self.rank} failed at allreduce {call}"
            if self._world is not None:
                self._world.break_(why)
            raise CommError(why)
        if self._world is None:
            return tensor
        tensor.copy_(self._world.meet(self.rank, tensor.detach().clone(), op))
        return tensor

    def broadcast_state(self, state: dict | None, src: int) -> dict:
        if self._world is None:
            return state
        payload = None
        if self.rank == src:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            payload = buffer.getvalue()
        payload = self._world.meet(self.rank, payload, "broadcast")
        if self.rank == src:
            return state
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
