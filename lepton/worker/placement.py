"""Where a worker runs: its cores, its threads, its scheduling policy, and the resources it
registers with (cores, memory, GPUs)."""

from __future__ import annotations

import os

import torch

from ..errors import LeptonError
from ..protocol import Resources


def batch_scheduling() -> None:
    """Run this thread (and the threads it starts from now on: gloo's, the heartbeat's, torch's
    intra-op pool) as a SCHED_BATCH task: a CPU-bound job that the Linux scheduler does not let
    preempt the running task when it wakes up. Workers wake from a collective together; two that
    share a core then take turns a step at a time instead of switching mid-step and evicting each
    other's weights from the cache.
    Measured (benchmarks/heterogeneous.py placement, 3 workers on 2 cores, 18 interleaved rounds):
    involuntary context switches −40%, samples/s +4.8% balanced and +4.1% balance-off; with a core per
    worker (2 on 2) no difference. Elsewhere (macOS, a kernel without it) nothing changes."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def apply_placement(cpus: list[int] | None, threads: int | None) -> Resources:
    """Pin this process to ``cpus`` (all it may use if None), run it as a batch task, give torch
    ``threads`` intra-op threads (one per usable core if None); returns what it then has."""
    if cpus:
        try:
            os.sched_setaffinity(0, set(cpus))
        except OSError as e:  # e.g. cores outside this container's cpuset
            raise LeptonError(
                f"--cpus {','.join(map(str, cpus))}: cannot run on these cores ({e.strerror or e})"
            ) from None
    usable = len(os.sched_getaffinity(0))
    batch_scheduling()
    n_threads = threads or usable
    torch.set_num_threads(n_threads)
    return _resources(usable, n_threads)


def _resources(usable: int, n_threads: int) -> Resources:
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 0.0
    # "name uuid" per visible GPU: the coordinator picks NCCL only when every worker has a GPU of its own
    props = (
        [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return Resources(
        cpus=usable,
        cpu_list=sorted(os.sched_getaffinity(0)),
        threads=n_threads,
        gpus=[f"{p.name} {p.uuid}" for p in props],
        gpu_memory_gb=[round(p.total_memory / 2**30, 1) for p in props],
        memory_gb=round(mem_gb, 1),
    )
