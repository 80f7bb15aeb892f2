"""The step-trace checker (lepton/worker/trace.py) on hand-made traces: the lineage rule (the last
generation that applied a step wins), an in-flight hole, and what it must catch."""

from lepton.sampler import GlobalBatchSampler
from lepton.worker.trace import TraceLine, check_traces

N, B, SEED = 50, 8, 3  # 7 steps an epoch
SAMPLER = GlobalBatchSampler(N, B, SEED)


def lines(gen: int, steps: range, shares: list[float], pids: list[int], t0: float = 0.0) -> list[TraceLine]:
    out = []
    for s in steps:
        for rank, pid in enumerate(pids):
            rows = SAMPLER.worker_slice(s, shares, rank)[0].tolist()
            out.append(TraceLine(pid, t0 + s, gen, rank, len(shares), s, shares, rows))
    return out


def test_redone_steps_and_in_flight_hole():
    total = 14
    trace = lines(0, range(0, 9), [0.5, 0.5], [1, 2])  # two workers to step 8
    trace += lines(1, range(5, 10), [1.0], [1], 100)  # all lost: checkpoint 5, one worker redoes 5..9
    # generation 2 (3 workers) from step 10; rank 2 dies after applying 12, before writing its line
    gen2 = lines(2, range(10, 13), [0.3, 0.3, 0.4], [1, 3, 4], 200)
    trace += [ln for ln in gen2 if not (ln.rank == 2 and ln.step == 12)]
    trace += lines(3, range(13, 14), [0.5, 0.5], [1, 3], 300)  # the survivors go on from 13
    rep = check_traces(trace, N, B, SEED, total)
    assert rep.ok, rep.problems()
    assert rep.in_flight == 1 and rep.redone_steps == 4 and rep.steps_in_lineage == total


def test_catches_a_lost_step_a_duplicate_and_a_wrong_slice():
    good = lines(0, range(14), [0.5, 0.5], [1, 2])
    rep = check_traces([ln for ln in good if ln.step != 6], N, B, SEED, 14)
    assert rep.missing_steps == [6] and rep.samples_lost > 0 and not rep.ok
    rep = check_traces(good + [good[5]], N, B, SEED, 14)
    assert rep.applied_twice and not rep.contiguous
    bad = [
        TraceLine(ln.pid, ln.t, ln.generation, ln.rank, ln.world, ln.step, ln.shares, ln.rows[:-1])
        if ln.step == 3 and ln.rank == 1
        else ln
        for ln in good
    ]
    rep = check_traces(bad, N, B, SEED, 14)
    assert rep.wrong_slices and rep.batch_mismatch == [3] and rep.samples_lost == 1


def test_a_rank_silent_later_in_its_generation_is_not_in_flight():
    good = lines(0, range(7), [0.5, 0.5], [1, 2])
    rep = check_traces([ln for ln in good if not (ln.step == 2 and ln.rank == 1)], N, B, SEED, 7)
    assert rep.missing_ranks == [(0, 1, 2)] and not rep.ok


def test_an_older_generation_after_a_newer_one_breaks_the_lineage():
    trace = lines(1, range(0, 4), [1.0], [1]) + lines(0, range(4, 7), [1.0], [2])
    rep = check_traces(trace, N, B, SEED, 7)
    assert rep.non_monotone == [4, 5, 6] and not rep.contiguous
