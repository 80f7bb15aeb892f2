"""The global-batch sampler: split counts, and every sample once per epoch however the batch is split."""

import numpy as np
import pytest

from lepton.sampler import GlobalBatchSampler, split_counts


@pytest.mark.parametrize(
    "total,weights",
    [(16, [1, 1]), (17, [1, 2, 5]), (5, [1, 1, 1]), (2, [1, 1, 1]), (512, [0.7, 0.2, 0.1]), (3, [100, 1, 1])],
)
def test_split_counts_sum_and_floor(total, weights):
    c = split_counts(total, weights)
    assert sum(c) == total and len(c) == len(weights)
    if total >= len(weights):
        assert min(c) >= 1


@pytest.mark.parametrize("shares", [[1.0], [1, 1], [1, 2, 5], [5, 1, 1, 1]])
def test_sampler_covers_each_epoch_exactly_once(shares):
    s = GlobalBatchSampler(103, 16, seed=7)
    for epoch in range(2):
        seen = []
        for step in range(epoch * s.steps_per_epoch, (epoch + 1) * s.steps_per_epoch):
            parts = [s.worker_slice(step, shares, r)[0] for r in range(len(shares))]
            assert np.array_equal(np.concatenate(parts), s.global_batch(step))
            seen += np.concatenate(parts).tolist()
        assert sorted(seen) == list(range(103))


def test_sampler_is_deterministic_and_reshuffles():
    a, b = GlobalBatchSampler(50, 8, 1), GlobalBatchSampler(50, 8, 1)
    assert np.array_equal(a.permutation(3), b.permutation(3))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
