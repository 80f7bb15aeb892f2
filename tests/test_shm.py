"""The shared-memory allreduce between real processes: exact results, and it never waits forever."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from lepton.comm.errors import CommError
from lepton.comm.shm import SHM_DIR, ShmAllreduce, available

pytestmark = [
    pytest.mark.skipif(not available(), reason="shared-memory reduction needs x86-64 Linux"),
    pytest.mark.timeout(120),
]
CAPACITY = 1 << 16


def _inputs(rank: int, call: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * call + rank)
    n = [1, 7, 1000, CAPACITY // 4][call % 4]  # sizes change from call to call; the last fills a slot
    return [torch.randn(n, generator=g), torch.randn(max(n // 2, 1), generator=g, dtype=torch.float64)]


def _rank_main(rank: int, world: int, port: int, scenario: str, out: mp.Queue) -> None:
    try:
        if scenario == "exact-chunked":  # every call takes the two-barrier path
            import lepton.comm.shm as shm_module

            shm_module.FULL_REDUCE_BYTES = 0
        store = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=30))
        # a timeout far beyond the 60 s the test waits for an answer: only the detection can end a wait
        shm = ShmAllreduce.connect(dist.PrefixStore("t/", store), rank, world, CAPACITY, timeout_s=600)
        if scenario.startswith("exact"):
            results = []
            for call in range(8):
                a, b = _inputs(rank, call)
                # numpy, not tensors: a queued tensor is shared through a file descriptor of this process
                results.append((shm.allreduce(a.clone()).numpy(), shm.allreduce(b.clone(), op="max").numpy()))
            out.put((rank, "ok", results, shm.fits(torch.zeros(CAPACITY // 4 + 1))))
            shm.close()
            return
        shm.allreduce(torch.ones(10))  # one good call first
        if rank == 1:
            if scenario == "die":
                os._exit(3)
            if scenario == "leave":
                shm.close()
                return
            if scenario == "hang":
                time.sleep(30)
                return
        if scenario == "hang":
            shm.should_abort = lambda waited: waited > 0.3  # as if the coordinator had regrouped
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            shm.allreduce(torch.ones(10))
            out.put((rank, "returned", None, None))
        except CommError as e:
            out.put((rank, "error", str(e), time.perf_counter() - t0, time.thread_time() - c0))
    except Exception:
        out.put((rank, "crash", traceback.format_exc(), None))


def _run(world: int, scenario: str, expect: int) -> list[tuple]:
    ctx = mp.get_context("spawn")
    master = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=30))
    out = ctx.Queue()
    before = set(os.listdir(SHM_DIR))
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, master.port, scenario, out)) for r in range(world)
    ]
    try:
        for p in procs:
            p.start()
        got = [out.get(timeout=60) for _ in range(expect)]
    except queue.Empty:
        pytest.fail(f"{scenario}: a rank did not answer within 60 s")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    crashes = [g[2] for g in got if g[1] == "crash"]
    assert not crashes, crashes[0]
    # only these ranks' segments (another test run, or Chromium, may use /dev/shm meanwhile)
    mine = tuple(f"lepton-{p.pid}-" for p in procs)
    assert not [f for f in set(os.listdir(SHM_DIR)) - before if f.startswith(mine)], "segment left behind"
    return sorted(got, key=lambda g: g[0])


@pytest.mark.parametrize("scenario", ["exact", "exact-chunked"])
def test_sum_and_max_equal_the_rank_order_reduction_on_every_rank(scenario):
    got = _run(3, scenario, expect=3)
    for call in range(8):
        ins = [_inputs(r, call) for r in range(3)]
        want_sum = ins[0][0] + ins[1][0] + ins[2][0]  # the order the segment sums in
        want_max = torch.maximum(torch.maximum(ins[0][1], ins[1][1]), ins[2][1])
        for rank, _, results, _ in got:
            s, m = map(torch.from_numpy, results[call])
            assert torch.equal(s, want_sum), (rank, call)  # bitwise: every rank holds the same bits
            assert torch.equal(m, want_max) and m.dtype == torch.float64
    assert all(g[3] is False for g in got)  # a larger tensor goes to gloo instead


@pytest.mark.parametrize(
    "scenario,needle",
    [
        ("die", "a peer process exited"),
        ("leave", "a peer left the generation"),
        ("hang", "the coordinator regrouped"),
    ],
)
def test_a_waiting_rank_gives_up_instead_of_hanging(scenario, needle):
    rank0 = _run(2, scenario, expect=1)[0]
    assert rank0[1] == "error" and needle in rank0[2], rank0  # the detection, not the (600 s) timeout
    if scenario == "hang":  # it slept on its futex, it did not spin
        assert rank0[4] < 0.5 * rank0[3], f"{rank0[4]:.3f} s of CPU in {rank0[3]:.3f} s of waiting"


def test_a_segment_larger_than_dev_shm_is_refused_and_removed():
    from lepton.comm.shm import _map

    path = os.path.join(SHM_DIR, f"lepton-test-{os.getpid()}")
    with pytest.raises(OSError):  # ENOSPC now, not a SIGBUS at the first write
        _map(path, 1 << 50, create=True)
    assert not os.path.exists(path)


def test_a_peer_that_leaves_right_after_a_complete_barrier_is_no_failure():
    import mmap

    from lepton.comm.shm import HEADER

    seg = ShmAllreduce(mmap.mmap(-1, HEADER + 5 * 64), rank=0, world=2, capacity=64, peers=[], timeout_s=5)
    seg.seq = 3
    seg._arrived[:2] = [3, 2]  # rank 1 has not arrived
    seg._abandoned[0] = 1  # ... and left the generation: this wait can never end
    with pytest.raises(CommError, match="a peer left the generation"):
        seg._check(seg._arrived, 0.01, "arrive")
    seg._arrived[1] = 3  # it arrived, then left: the barrier is complete
    seg._check(seg._arrived, 0.01, "arrive")  # the waiter returns instead of failing the step
    seg.close(abandon=False)


def test_a_peer_that_never_answers_leaves_no_segment_behind():
    """Rank 0 creates the segment, its peer dies before answering: the store times out, and the file in
    /dev/shm (the size of the gradients, several times over) must not outlive the failed formation."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=1), wait_for_workers=False)
    before = set(os.listdir(SHM_DIR))
    with pytest.raises(dist.DistStoreError):  # the store timed out
        ShmAllreduce.connect(dist.PrefixStore("t/", server), 0, 2, CAPACITY, timeout_s=1)
    assert not {f for f in set(os.listdir(SHM_DIR)) - before if f.startswith(f"lepton-{os.getpid()}-")}


def test_a_peer_gone_before_its_pidfd_is_opened_is_a_collective_error():
    """A peer that answered 'ok' and died before the others opened its pidfd: a CommError (regroup),
    not another exception that would fail the job; and no segment is left behind."""

    class Store:  # rank 1's answer names a process that no longer exists
        def __init__(self):
            self.d = {}

        def set(self, k, v):
            self.d[k] = v.encode()

        def get(self, k):
            if k == "shm/1":
                return f"ok {2**22 + 12345} {self.d['shm/0'].decode().split()[2]} 0".encode()
            return self.d[k]

    before = set(os.listdir(SHM_DIR))
    with pytest.raises(CommError, match="a peer exited"):
        ShmAllreduce.connect(Store(), 0, 2, CAPACITY, timeout_s=5)
    assert not {f for f in set(os.listdir(SHM_DIR)) - before if f.startswith(f"lepton-{os.getpid()}-")}
