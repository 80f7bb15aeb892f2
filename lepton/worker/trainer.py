"""The per-step math of one replica: forward, backward, exact reduction, update; and evaluation.

Contract with the worker loop (which touches the trainer only between steps):
- ``train_step`` runs global step ``self.step`` and increments it; every rank of a generation must
  call it with the same ``shares`` and the same ``self.step`` (they agree after ``load_state``);
- ``state``/``load_state`` capture everything that defines the next step (model, optimizer, step);
- ``evaluate`` is a collective too: every rank calls it for the same split at the same step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, cast

import numpy as np
import torch

from .. import metrics, policies
from ..comm import FlatGradients, GenerationGroup
from ..model import batchnorm, dropout
from ..model.builders import build_model, build_optimizer, load_init_weights, num_outputs, zero_masks
from ..sampler import GlobalBatchSampler, split_counts
from ..spec import JobSpec, KeepBestSpec
from ..storage.prepared import DataCache
from . import step_control
from .step_control import ReducedControl, StepControl
from .trace import StepTrace

EVAL_CHUNK = 4096


class Diverged(RuntimeError):
    """Too many non-finite steps in a row; the message says what to change."""


@dataclass
class StepResult:
    loss: float  # mean loss over the global batch
    batch: int  # global batch size of this step
    local: int  # samples this rank computed
    compute_s: float  # time in forward/backward (excludes waiting in the collective)
    compute_cpu_s: float  # processor time of the same window (CPU seconds of this process)
    overhead_s: float  # processor time of the reduction work and the update (wall on a GPU):
    # what the step costs this rank whatever its share
    wall_s: float
    regroup: bool  # some rank asked to end the generation after this step (all see it)
    skipped: bool  # the reduced loss or gradient was not finite: no update anywhere
    next_shares: list[float] | None  # some rank knew the next share plan: every rank applies it next


class Trainer:
    def __init__(self, job: JobSpec, cache: DataCache, factory=None, device: torch.device | None = None):
        self.job, self.task, self.cache = job, job.task, cache
        self.device = device or torch.device("cpu")
        pre = cache.preprocessor
        model = build_model(job, pre.input_shape, num_outputs(job.task, pre.classes), factory)
        load_init_weights(job, model)
        # model.batch_norm global (default): BatchNorm layers normalise over the global batch, and every
        # pass of a step is then a collective
        self.global_bn = batchnorm.prepare(model, job.model.batch_norm, job.cluster.max_micro_batch)
        # dropout masks follow the samples, not the rank that computes them (worker/dropout.py)
        dropout.convert(model)
        self.model = model.to(self.device)
        # BatchNorm running statistics change in the forward pass: a step skipped for a non-finite loss
        # puts them back, so that it changes nothing anywhere (a NaN running variance would stay for good)
        self.bn_buffers = [
            b
            for m in self.model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()
        ]
        # model.keep_zeros: the zeros of the starting weights (a pruned model), from the init file even
        # when a checkpoint is loaded next, so a resumed fine-tune keeps the same ones
        self.masks = zero_masks(self.model) if job.model.keep_zeros else []
        self.optimizer = build_optimizer(job, self.model.parameters())
        # the step's control values ride after the gradients (worker/step_control.py); train_step
        # sizes them for the generation's world
        self.grads = FlatGradients(self.model, extra_slots=step_control.FIXED_SLOTS)
        # called with the sample count inside the compute window (throttle)
        self.compute_hook: Callable[[int], None] | None = None
        self.poison: Callable[[int], bool] | None = None  # make this rank's loss NaN (fault injection)
        self.lr_scale = 1.0  # lowered by the divergence guard; part of the replicated state
        self.plan_lr = 1.0  # the evaluation policies' learning-rate factor
        self.policies = policies.build(job.policies, job.train.optimizer.lr)
        self.stopped_early = False  # early stopping decided: train no further
        kb = job.policies.keep_best
        self.keep_best = policies.Tracker(kb.mode, 0.0) if kb else None  # best validation value and its step
        self.bad_steps = 0
        self.x, self.y = cache.get("train")
        self.sampler = GlobalBatchSampler(len(self.y), job.train.batch_size, job.seed)
        self.total_steps = self.sampler.steps_per_epoch * job.train.epochs
        self.step = 0
        self.evaluated_step = -1  # step of the last completed periodic validation
        self._trace = StepTrace.from_env()  # which samples each applied step used (worker/trace.py)

    # --- state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "evaluated_step": self.evaluated_step,
            "lr_scale": self.lr_scale,
            "bad_steps": self.bad_steps,
            "plan_lr": self.plan_lr,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "policies": [p.state() for p in self.policies],
            "stopped_early": self.stopped_early,
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.evaluated_step = int(state.get("evaluated_step", -1))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.plan_lr = float(state.get("plan_lr", 1.0))
        if self.keep_best:
            self.keep_best.best, self.keep_best.best_step = state.get("best_value"), state.get("best_step")
        for p, st in zip(self.policies, state.get("policies", [])):
            p.load(st)
        self.stopped_early = bool(state.get("stopped_early", False))

    def lr_at(self, step: int) -> float:
        """The learning rate of global ``step``: schedule × warm-up × the divergence guard's scale."""
        sched, base = self.job.train.lr_schedule, self.job.train.optimizer.lr
        if sched.type == "step":
            lr = base * sched.gamma ** (step // sched.step_size)
        elif sched.type == "cosine":
            span = max(1, self.total_steps - sched.warmup_steps)
            t = min(max(step - sched.warmup_steps, 0), span) / span
            lr = sched.min_lr + (base - sched.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        else:
            lr = base
        if step < sched.warmup_steps:
            lr *= (step + 1) / sched.warmup_steps
        return lr * self.lr_scale * self.plan_lr

    def decide(self, m: dict) -> list:
        """Feed a validation result to the policies and apply their decisions now (every rank
        holds the same metrics, so every rank decides the same at this step)."""
        out = []
        for p in self.policies:
            d = p.observe(self.step, m)
            if d is not None:
                if d.kind == "lr":
                    self.plan_lr = d.lr_factor
                else:
                    self.stopped_early = True
                out.append(d)
        return out

    @property
    def best_value(self) -> float | None:
        return self.keep_best.best if self.keep_best else None

    @property
    def best_step(self) -> int | None:
        return self.keep_best.best_step if self.keep_best else None

    def improved(self, metrics: dict) -> bool:
        """Keep-best: is this validation the best so far? Every rank sees the same reduced metrics,
        so every rank answers the same."""
        if not self.keep_best:
            return False
        kb = cast(KeepBestSpec, self.job.policies.keep_best)  # the tracker exists only with keep_best
        value = policies.metric_value(metrics, kb.metric)
        return value is not None and self.keep_best.update(self.step, value)

    @property
    def epoch(self) -> int:
        return self.step // self.sampler.steps_per_epoch

    def at_epoch_end(self) -> bool:
        return self.step % self.sampler.steps_per_epoch == 0

    # --- training ----------------------------------------------------------------------------------
    def train_step(
        self,
        group: GenerationGroup,
        shares: list[float],
        rank: int,
        regroup: bool = False,
        next_plan: list[float] | None = None,
    ) -> StepResult:
        """One global step.

        ``regroup`` is this rank's vote to end the generation after the step; ``next_plan`` the next
        share plan if this rank has received it from the coordinator. Both ride in the gradient
        allreduce (worker/step_control.py), so every rank learns the same outcome at the same step:
        the generation ends if any rank voted, and the next plan reaches every rank as soon as one
        knows it (``StepResult.next_shares``: the plan's shares as the reduction returned them, the
        same bits on every rank).
        """
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        indices, batch = self.sampler.worker_slice(self.step, shares, rank)
        world = len(shares)
        if self.grads.extra.numel() != step_control.slots(world):  # a new world size: every rank's
            self.grads = FlatGradients(self.model, extra_slots=step_control.slots(world))  # buffer has it
        self.model.train()
        self.grads.zero()
        bn_before = [b.clone() for b in self.bn_buffers] if self.bn_buffers else ()
        loss_sum = self.forward_backward_step(group, indices, batch)
        StepControl(loss_sum, len(indices), regroup, next_plan).pack(self.grads.extra, world)
        compute, compute_cpu = self._compute_window(start_wall, start_cpu)
        group.allreduce(self.grads.flat)
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        update_start = clock()
        reduced = ReducedControl.unpack(self.grads.extra, world)
        # the global sample count equals ``batch`` unless a peer disagrees on the plan, which would
        # break invariant 1, so it is checked rather than trusted
        if reduced.samples != batch:
            raise RuntimeError(
                f"step {self.step}: the generation computed {reduced.samples} samples, expected {batch}"
            )
        finite = self._update(batch, bn_before)
        if self._trace:
            self._trace.record(group.generation, rank, self.step, self.epoch, shares, indices, not finite)
        self.step += 1
        overhead = group.work_s + clock() - update_start
        return StepResult(
            reduced.loss_sum / batch,
            batch,
            len(indices),
            compute,
            compute_cpu,
            overhead,
            time.perf_counter() - start_wall,
            skipped=not finite,
            regroup=reduced.regroup,
            next_shares=reduced.next_shares,
        )

    def forward_backward_step(self, group: GenerationGroup, indices: np.ndarray, batch: int) -> float:
        """This rank's samples ``indices`` of a global batch of ``batch``: the forward and backward
        passes, gradients summed into the flat buffer; returns their summed loss.

        A share above ``cluster.max_micro_batch`` is computed in micro-batches whose gradients
        accumulate in the same buffer (the sum is unchanged, dropout masks too: they are keyed by
        sample). With global BatchNorm every rank makes exactly one pass, an empty one if its slice is
        empty (its layers' statistics are collectives); otherwise a rank without samples computes
        nothing."""
        if not (len(indices) or self.global_bn):
            return 0.0
        chunk = self.job.cluster.max_micro_batch or len(indices)
        loss_sum = 0.0
        with batchnorm.reducing(group, batch) if self.global_bn else contextlib.nullcontext():
            for lo in range(0, max(len(indices), 1), max(chunk, 1)):
                part = indices[lo : lo + chunk]
                inputs = torch.from_numpy(np.take(self.x, part, axis=0)).to(self.device)
                targets = torch.from_numpy(np.take(self.y, part, axis=0)).to(self.device)
                # the backward too: an activation-checkpointing recompute redraws the forward's masks
                with dropout.keyed(self.job.seed, self.step, part):
                    loss = metrics.loss_fn(self.task, self.model(inputs), targets)
                    if self.poison and self.poison(self.step):
                        loss = loss * float("nan")
                    loss.backward()
                loss_sum += float(loss.detach())
        if self.compute_hook:
            self.compute_hook(len(indices))
        return loss_sum

    def _compute_window(self, start_wall: float, start_cpu: float) -> tuple[float, float]:
        """Wall and processor seconds of this step's compute so far, what the balancer measures."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: the compute window ends here
        compute, compute_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        if self.global_bn:
            waited, waited_cpu, mismatched = batchnorm.step_totals()
            if mismatched:  # every rank sees it: the tags were reduced too
                raise RuntimeError(
                    f"step {self.step}: the ranks' BatchNorm passes did not pair up (the model calls"
                    " its BatchNorm layers a different number of times or in another order on some"
                    " rank); set model.batch_norm: local for such a model"
                )
            # time in these collectives is waiting for peers, not compute
            compute, compute_cpu = max(compute - waited, 0.0), max(compute_cpu - waited_cpu, 0.0)
        return compute, compute_cpu

    def _update(self, batch: int, bn_before) -> bool:
        """The optimizer step on the reduced gradients, or a skipped step if they are not finite.
        Every rank holds the same reduced values, so every rank takes the same branch (invariant 5)."""
        self.grads.grads.div_(batch)
        # one sum over the whole buffer (gradients and loss) is non-finite iff some entry is, or the
        # gradient is so large that it overflows: a step to skip either way (~20x cheaper than isfinite)
        finite = math.isfinite(float(self.grads.flat.sum()))
        if not finite:
            self._skip_step(bn_before)
            return False
        self.bad_steps = 0
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = self.lr_at(self.step)
        # keep_zeros: a zero gradient gives a zero entry no update (Adam's moments stay 0, weight
        # decay scales 0), as prune's weight_orig × mask would; the weights are masked again after
        # the step so no rounding can bring one back
        for param, mask in self.masks:
            cast(torch.Tensor, param.grad).mul_(mask)  # FlatGradients gives every parameter a .grad
        self.optimizer.step()
        if self.masks:
            with torch.no_grad():
                for param, mask in self.masks:
                    param.mul_(mask)
        return True

    def _skip_step(self, bn_before) -> None:
        """A non-finite step changes nothing anywhere: BatchNorm's running statistics, changed in the
        forward pass, are put back; the divergence guard lowers the learning rate, and gives up after
        ``train.divergence.max_consecutive`` such steps in a row."""
        for buffer, before in zip(self.bn_buffers, bn_before):
            buffer.copy_(before)
        self.bad_steps += 1
        self.lr_scale *= self.job.train.divergence.lr_factor
        if self.bad_steps >= self.job.train.divergence.max_consecutive:
            raise Diverged(
                f"training diverged: {self.bad_steps} steps in a row with a non-finite loss or"
                f" gradient (last: step {self.step}); train.divergence.max_consecutive="
                f"{self.job.train.divergence.max_consecutive}. Lower train.optimizer.lr;"
                " the last checkpoint is intact"
            )

    def probe_fixed_cost(self, repeats: int = 3) -> float:
        """Processor seconds (wall on a GPU) of a one-sample forward and backward pass: what a compute
        window costs whatever its size (per-operation dispatch), for the balancer's cost model
        (worker/meter.py). Touches nothing a step depends on: eval mode (no batch-norm statistics, no
        dropout random numbers) and ``autograd.grad``, which returns the gradients instead of adding
        them to the buffer. The minimum of ``repeats`` runs: the cheapest is the least disturbed."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            return 0.0
        was_training = self.model.training
        self.model.eval()
        gpu = self.device.type == "cuda"
        clock = time.perf_counter if gpu else time.process_time
        best = float("inf")
        try:
            for _ in range(repeats):
                t0 = clock()
                xb = torch.from_numpy(np.take(self.x, [0], axis=0)).to(self.device)
                yb = torch.from_numpy(np.take(self.y, [0], axis=0)).to(self.device)
                torch.autograd.grad(metrics.loss_fn(self.task, self.model(xb), yb), params, allow_unused=True)
                if gpu:
                    torch.cuda.synchronize()
                best = min(best, clock() - t0)
        finally:
            self.model.train(was_training)
        return best

    @torch.no_grad()
    def replicas_agree(self, group: GenerationGroup) -> bool:
        """Invariant 3, checked: the max and the min over ranks of a checksum of the parameters and of
        BatchNorm's running statistics coincide (non-finite values count as 0: a buffer that holds -inf
        by design, such as an attention mask, must not make a replica disagree with itself)."""
        self.sync_local_batch_norm(group)
        state = list(self.model.parameters()) + [b for b in self.bn_buffers if b.is_floating_point()]
        finite = (torch.nan_to_num(p.double(), 0.0, 0.0, 0.0) for p in state)
        c = cast(torch.Tensor, sum(v.sum() + (v * v).sum() for v in finite)).cpu()  # a model has parameters
        t = torch.stack([c, -c])
        group.allreduce(t, op="max")
        return bool(t[0] == -t[1])

    # --- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_local_batch_norm(self, group: GenerationGroup) -> None:
        """``model.batch_norm: local``: each rank's running statistics follow its own slices; give every
        rank rank 0's (what DDP's broadcast_buffers does, and what the checkpoints and the final model
        hold), so that evaluation scores one model. A collective: every rank calls it."""
        own = [b for b in self.bn_buffers if b.is_floating_point()]
        if self.global_bn or not own or group.world == 1:
            return
        flat = torch.cat([b.reshape(-1).double() for b in own])
        if group.rank != 0:
            flat.zero_()
        group.allreduce(flat)  # rank 0's values + zeros: exact
        offset = 0
        for b in own:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    @torch.no_grad()
    def evaluate(self, group: GenerationGroup, split: str, confusion: bool = False) -> dict:
        """Metrics of ``split``; each rank scores a contiguous slice and the sums are reduced exactly."""
        self.sync_local_batch_norm(group)
        x, y = self.cache.get(split)
        counts = split_counts(len(y), [1.0] * group.world)
        lo = sum(counts[: group.rank])
        hi = lo + counts[group.rank]
        classes = len(self.cache.preprocessor.classes or [])
        self.model.eval()
        sums = metrics.empty_sums(self.task, classes)
        for s in range(lo, hi, EVAL_CHUNK):
            e = min(s + EVAL_CHUNK, hi)
            out = self.model(torch.from_numpy(np.asarray(x[s:e])).to(self.device)).cpu()
            sums += metrics.batch_sums(self.task, out, torch.from_numpy(np.asarray(y[s:e])), classes)
        group.allreduce(sums)
        return metrics.finish(self.task, sums, classes, confusion)
