"""The deterministic sampler: which samples form global step g, and which part each worker computes.

Contract (invariants 1 and 2, docs/architecture.md):
- epoch e uses the permutation ``default_rng([seed, e]).permutation(n)`` of the training rows;
- step s of an epoch is rows ``perm[s*B : (s+1)*B]``; the last step of an epoch takes the remainder,
  so every sample is used exactly once per epoch (no drop_last);
- a step's batch is split into contiguous slices, one per rank, sized by the plan's shares with the
  largest-remainder method; the slices depend only on (step, shares), never on timing.
Any number of workers with any shares therefore covers exactly the same samples at every step.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Integer counts proportional to ``weights`` summing to ``total``.

    Largest remainder; ties go to the lower rank. When ``total >= len(weights)`` nobody gets zero
    (a plan share is never silently drained by rounding)."""
    k = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    order = sorted(range(k), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    if total >= k:
        for i in range(k):
            if counts[i] == 0:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[i] += 1
    return [int(c) for c in counts]


class GlobalBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = math.ceil(num_samples / batch_size)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def locate(self, global_step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        return divmod(global_step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return cast(np.ndarray, self._perm)  # set together with ``_perm_epoch``

    def global_batch(self, global_step: int) -> np.ndarray:
        epoch, s = self.locate(global_step)
        return self.permutation(epoch)[s * self.batch_size : (s + 1) * self.batch_size]

    def worker_slice(self, global_step: int, shares: list[float], rank: int) -> tuple[np.ndarray, int]:
        """(this rank's sample indices, size of the whole global batch) for ``global_step``."""
        batch = self.global_batch(global_step)
        counts = split_counts(len(batch), shares)
        start = sum(counts[:rank])
        return batch[start : start + counts[rank]], len(batch)
