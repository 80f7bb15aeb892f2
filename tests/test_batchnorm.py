"""Global-batch BatchNorm (lepton/comm/batchnorm.py): the math against torch's BatchNorm, ranks
simulated by threads that sum through a barrier, and a model with BatchNorm trained by real worker
processes that is the same for 1 and 3 workers with unequal shares (invariant 1)."""
import json
import threading

import pytest
import torch
from torch import nn

import lepton
from conftest import job_dict, make_classification_csv, max_rel_diff, weights
from lepton.comm import batchnorm
from lepton.errors import SpecError

pytestmark = pytest.mark.timeout(180)


class ThreadGroup:
    """``allreduce`` (sum, in rank order) among threads: what a generation group gives every rank."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def member(self, rank: int):
        group = self

        class Member:
            def allreduce(self, t):
                group.slots[rank] = t.clone()
                group.barrier.wait()
                total = group.slots[0].clone()
                for x in group.slots[1:]:
                    total += x
                group.barrier.wait()
                t.copy_(total)
                return t
        return Member()


def _pair(channels=5, dims=2):
    torch.manual_seed(0)
    ref = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, momentum=0.3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    box = nn.Sequential(ref)
    mine = nn.Sequential(type(ref)(channels, momentum=0.3))
    mine.load_state_dict(box.state_dict())
    assert batchnorm.convert(mine) == 1 and isinstance(mine[0], batchnorm.GlobalBatchNorm)
    return box, mine


@pytest.mark.parametrize("splits", [[12], [5, 7], [3, 0, 9]])
def test_global_statistics_equal_one_batch_norm_over_the_whole_batch(splits):
    box, mine = _pair()
    x = torch.randn(sum(splits), 5, 4, 3) * 3 + 7        # an offset mean: E[x²] − E[x]² must not cancel
    dy = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (box(xr) * dy).sum().backward()

    group = ThreadGroup(len(splits))
    bounds = [sum(splits[:r]) for r in range(len(splits) + 1)]
    grads, replicas, errors = [None] * len(splits), [], []

    def rank(r):
        try:
            model = mine if r == 0 else __import__("copy").deepcopy(mine)
            replicas.append(model)
            xs = x[bounds[r]:bounds[r + 1]].clone().requires_grad_(True)
            with batchnorm.reducing(group.member(r)):
                (model(xs) * dy[bounds[r]:bounds[r + 1]]).sum().backward()
            grads[r] = (xs.grad, model[0].weight.grad, model[0].bias.grad, model.state_dict())
        except Exception as e:      # surfaced below, not lost in the thread
            errors.append(e)
            group.barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(splits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    dx = torch.cat([g[0] for g in grads])
    assert torch.allclose(dx, xr.grad, atol=1e-5, rtol=1e-4)
    # weight/bias gradients: each rank's own sums, added up by the step's gradient reduction
    assert torch.allclose(sum(g[1] for g in grads), box[0].weight.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(sum(g[2] for g in grads), box[0].bias.grad, atol=1e-4, rtol=1e-4)
    for g in grads:                  # every rank's running statistics: those of the whole batch
        for k, v in box.state_dict().items():
            assert torch.allclose(g[3][k].float(), v.float(), atol=1e-5, rtol=1e-5), k


def test_outside_a_step_and_in_evaluation_it_is_batch_norm():
    box, mine = _pair(dims=1)
    x = torch.randn(16, 5)
    assert torch.allclose(mine(x), box(x), atol=1e-5)              # training mode, no group: own batch
    box.eval(), mine.eval()
    assert torch.allclose(mine(x), box(x), atol=1e-6)              # running statistics
    assert list(mine.state_dict()) == list(box.state_dict())        # same names: checkpoints, exports


def test_micro_batches_are_refused_for_a_model_with_batch_norm():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batchnorm.check_micro_batches(None, model)
    with pytest.raises(SpecError, match="cluster.max_micro_batch: the model has BatchNorm"):
        batchnorm.check_micro_batches(64, model)


def test_a_model_with_batch_norm_is_the_same_for_any_worker_count(tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    runs = {}
    for label, workers, shares in (("1", 1, None), ("3-unequal", 3, [1, 2, 5])):
        job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_bn"})
        job["cluster"]["shares"] = shares
        res = lepton.train(job, workers=workers, run_dir=tmp_path / f"run-{label}")
        assert res.status == "completed", res.reason
        assert res.summary["replicas_agree"] is True          # running statistics included
        runs[label] = res
    w1, w3 = weights(runs["1"].run_dir), weights(runs["3-unequal"].run_dir)
    assert "1.running_var" in w1
    diff = max_rel_diff({k: v.float() for k, v in w3.items()}, {k: v.float() for k, v in w1.items()})
    assert diff <= 1e-4, f"3 workers with unequal shares differ from 1 by {diff:.2e}"
    assert runs["3-unequal"].summary["test"]["accuracy"] == pytest.approx(runs["1"].summary["test"]["accuracy"], abs=1e-9)


def test_local_batch_norm_is_per_worker_and_allows_micro_batches(tmp_path):
    """model.batch_norm: local keeps torch's BatchNorm (each worker's slice, as in DDP); global refuses
    micro-batches before anything is written."""
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_bn"}, train__epochs=1)
    job["cluster"]["max_micro_batch"] = 4
    with pytest.raises(SpecError, match="cluster.max_micro_batch: the model has BatchNorm"):
        lepton.train(job, workers=2, run_dir=tmp_path / "global")
    assert not (tmp_path / "global").exists()
    job["model"]["batch_norm"] = "local"
    res = lepton.train(job, workers=2, run_dir=tmp_path / "local")
    assert res.status == "completed", res.reason
