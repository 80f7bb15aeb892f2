"""Global-batch BatchNorm (lepton/comm/batchnorm.py): the math against torch's BatchNorm, ranks
simulated by threads that sum through a barrier, and a model with BatchNorm trained by real worker
processes that is the same for 1 and 3 workers with unequal shares (invariant 1)."""

import copy
import threading

import pytest
import torch
from torch import nn

import lepton
from conftest import job_dict, make_classification_csv, max_rel_diff, weights
from lepton.errors import SpecError
from lepton.model import batchnorm

pytestmark = pytest.mark.timeout(180)


class ThreadGroup:
    """``allreduce`` (sum, in rank order) among threads: what a generation group gives every rank."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def member(self, rank: int):
        group = self

        class Member:
            world = group.world

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


def _pair(channels=5, dims=2, affine=True, momentum=0.3):
    torch.manual_seed(0)
    kind = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    ref = kind(channels, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    # an in-place op after the layer (common in CNNs) must not break its backward
    box = nn.Sequential(ref, nn.ReLU(inplace=True))
    mine = nn.Sequential(kind(channels, momentum=momentum, affine=affine), nn.ReLU(inplace=True))
    mine.load_state_dict(box.state_dict())
    assert batchnorm.convert(mine) == 1 and isinstance(mine[0], batchnorm.GlobalBatchNorm)
    return box, mine


@pytest.mark.parametrize(
    "splits,dims,affine,momentum",
    [
        ([12], 2, True, 0.3),
        ([5, 7], 2, True, 0.3),
        ([3, 0, 9], 2, True, 0.3),
        ([6, 7], 1, False, None),
        ([2, 5, 4], 3, True, None),
    ],
)
@pytest.mark.parametrize("arithmetic", ["host", "device"])
def test_global_statistics_equal_one_batch_norm_over_the_whole_batch(
    splits, dims, affine, momentum, arithmetic, monkeypatch
):
    if arithmetic == "device":  # the torch implementation a GPU runs, here on CPU tensors
        monkeypatch.setattr(batchnorm, "_on_host", lambda t: False)
    box, mine = _pair(dims=dims, affine=affine, momentum=momentum)
    shape = {1: (5,), 2: (5, 4, 3), 3: (5, 2, 3, 2)}[dims]
    # two steps on different batches: the running statistics' update twice (momentum None: their mean)
    batches = [
        torch.randn(sum(splits), *shape) * 3 + 7 + i for i in range(2)
    ]  # an offset mean: E[x²] − E[x]²
    x = batches[-1]  # must not cancel
    dy = torch.randn_like(x)
    for xb in batches:
        xr = xb.clone().requires_grad_(True)
        box.zero_grad()
        (box(xr) * dy).sum().backward()

    group = ThreadGroup(len(splits))
    bounds = [sum(splits[:r]) for r in range(len(splits) + 1)]
    grads, replicas, errors = [None] * len(splits), [], []

    def rank(r):
        try:
            model = mine if r == 0 else copy.deepcopy(mine)
            replicas.append(model)
            for xb in batches:
                xs = xb[bounds[r] : bounds[r + 1]].clone().requires_grad_(True)
                for p in model.parameters():
                    p.grad = None
                with batchnorm.reducing(group.member(r), len(x)):
                    (model(xs) * dy[bounds[r] : bounds[r + 1]]).sum().backward()
                assert not batchnorm.step_totals()[2], "the ranks' passes paired up"
            bn = model[0]
            grads[r] = (
                xs.grad,
                bn.weight.grad if affine else None,
                bn.bias.grad if affine else None,
                model.state_dict(),
            )
        except Exception as e:  # surfaced below, not lost in the thread
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
    if affine:  # weight/bias gradients: each rank's own sums, added up by the step's gradient reduction
        assert torch.allclose(sum(g[1] for g in grads), box[0].weight.grad, atol=1e-4, rtol=1e-4)
        assert torch.allclose(sum(g[2] for g in grads), box[0].bias.grad, atol=1e-4, rtol=1e-4)
    for g in grads:  # every rank's running statistics: those of the whole batch
        for k, v in box.state_dict().items():
            assert torch.allclose(g[3][k].float(), v.float(), atol=1e-5, rtol=1e-5), k


def test_outside_a_step_and_in_evaluation_it_is_batch_norm():
    box, mine = _pair(dims=1)
    x = torch.randn(16, 5)
    assert torch.allclose(mine(x), box(x), atol=1e-5)  # training mode, no group: own batch
    box.eval(), mine.eval()
    assert torch.allclose(mine(x), box(x), atol=1e-6)  # running statistics
    assert list(mine.state_dict()) == list(box.state_dict())  # same names: checkpoints, exports


def test_what_global_batch_norm_refuses():
    """Micro-batches; BatchNorm layers it cannot make global (they would silently stay per worker);
    a batch size that leaves every epoch a 1-sample last step for an (N, C) BatchNorm."""
    assert batchnorm.prepare(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "global", None)
    assert not batchnorm.prepare(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "local", 64)
    with pytest.raises(SpecError, match="cluster.max_micro_batch: the model has BatchNorm"):
        batchnorm.prepare(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "global", 64)
    for odd in (nn.BatchNorm1d(4, track_running_stats=False), nn.LazyBatchNorm1d()):
        with pytest.raises(SpecError, match=f"also has {type(odd).__name__}.*model.batch_norm: local"):
            batchnorm.prepare(nn.Sequential(nn.Linear(3, 4), odd), "global", None)
    mlp, cnn = (
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),
    )
    batchnorm.check_last_step(mlp, (3,), train_rows=100, batch_size=16)  # 100 % 16 = 4
    batchnorm.check_last_step(cnn, (1, 5, 5), train_rows=97, batch_size=16)  # 9 values per channel
    with pytest.raises(SpecError, match="train.batch_size: 16 leaves 1 sample .*97 training rows"):
        batchnorm.check_last_step(mlp, (3,), train_rows=97, batch_size=16)


def test_passes_that_do_not_pair_up_are_detected():
    """Two ranks that call two same-width layers in opposite orders: same number of collectives, but
    the tags differ, so the statistics are not silently mixed."""
    torch.manual_seed(0)
    base = nn.ModuleList([nn.BatchNorm1d(3), nn.BatchNorm1d(3)])
    batchnorm.convert(base)
    group, seen, errors = ThreadGroup(2), [None, None], []

    def rank(r):
        try:
            layers = copy.deepcopy(base)
            order = [layers[0], layers[1]] if r == 0 else [layers[1], layers[0]]
            x = torch.randn(4, 3, requires_grad=True)
            with batchnorm.reducing(group.member(r), 8):
                order[1](order[0](x)).sum().backward()
            seen[r] = batchnorm.step_totals()[2]
        except Exception as e:
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and seen == [True, True]


def test_a_model_with_batch_norm_is_the_same_for_any_worker_count(tmp_path):
    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    runs = {}
    for label, workers, shares in (("1", 1, None), ("3-unequal", 3, [1, 2, 5])):
        job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_bn"})
        job["cluster"]["shares"] = shares
        res = lepton.train(job, workers=workers, run_dir=tmp_path / f"run-{label}")
        assert res.status == "completed", res.reason
        assert res.summary["replicas_agree"] is True  # running statistics included
        runs[label] = res
    w1, w3 = weights(runs["1"].run_dir), weights(runs["3-unequal"].run_dir)
    assert "1.running_var" in w1
    diff = max_rel_diff({k: v.float() for k, v in w3.items()}, {k: v.float() for k, v in w1.items()})
    assert diff <= 1e-4, f"3 workers with unequal shares differ from 1 by {diff:.2e}"
    assert runs["3-unequal"].summary["test"]["accuracy"] == pytest.approx(
        runs["1"].summary["test"]["accuracy"], abs=1e-9
    )


def test_local_batch_norm_is_per_worker_and_allows_micro_batches(tmp_path):
    """model.batch_norm: local keeps torch's BatchNorm (each worker's slice, as in DDP); global refuses
    micro-batches before anything is written."""
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_bn"}, train__epochs=1)
    job["cluster"]["max_micro_batch"] = 4
    with pytest.raises(SpecError, match="cluster.max_micro_batch: the model has BatchNorm"):
        lepton.train(job, workers=2, run_dir=tmp_path / "global")
    assert not (tmp_path / "global").exists()
    job["model"].update(batch_norm="local", factory="factory_models:build_bn_masked")
    res = lepton.train(job, workers=2, run_dir=tmp_path / "local")
    assert res.status == "completed", res.reason
    # every rank evaluates with rank 0's running statistics (as DDP); a -inf buffer agrees with itself
    assert res.summary["replicas_agree"] is True


def test_a_factory_that_hands_out_one_instance(tmp_path):
    """The launcher checks the model on a copy: the user's instance (and the workers' pickle of the
    factory) keeps plain BatchNorm, and the workers still normalise over the global batch."""
    from factory_models import build_bn

    data = make_classification_csv(tmp_path / "data.csv", rows=300)
    shared = build_bn((6,), 3)
    job = job_dict(data, model={"type": "factory", "factory": lambda shape, n: shared})
    job["cluster"]["shares"] = [1, 2, 5]  # a 1-sample slice: per-worker statistics would fail
    res = lepton.train(job, workers=3, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    assert type(shared[1]) is nn.BatchNorm1d


def test_a_skipped_step_leaves_the_running_statistics_alone(tmp_path, monkeypatch):
    """A step skipped for a non-finite loss changes nothing anywhere: its forward pass had already
    moved BatchNorm's running statistics, which are put back."""
    data = make_classification_csv(tmp_path / "data.csv", rows=200)
    job = job_dict(data, model={"type": "factory", "factory": "factory_models:build_bn"}, train__epochs=1)
    monkeypatch.setenv("LEPTON_FAULTS", "nan:rank=1:step=3")
    res = lepton.train(job, workers=2, run_dir=tmp_path / "run")
    assert res.status == "completed", res.reason
    assert int(weights(res.run_dir)["1.num_batches_tracked"]) == res.summary["steps"] - 1
    assert res.summary["replicas_agree"] is True
