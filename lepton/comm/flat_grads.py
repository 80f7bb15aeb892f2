"""Exact gradient reduction through one flat buffer.

Every parameter's ``.grad`` is a view into a single flat tensor, so backward accumulates straight into
it and one allreduce per step moves every gradient plus the step-control slots appended at the end
(worker/step_control.py: loss sum, sample count, votes, the next plan). Each worker's loss is a SUM
over its own samples; after the sum reduction the gradient is divided by the global batch size,
which makes the update the mean over exactly the B samples of the step, however they were split
(invariant 1).
"""

from __future__ import annotations

import torch
from torch import nn


class FlatGradients:
    def __init__(self, model: nn.Module, extra_slots: int):
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else torch.device("cpu")
        self.flat = torch.zeros(numel + extra_slots, dtype=dtype, device=device)
        self.numel = numel
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = self.flat[offset : offset + n].view_as(p)
            offset += n
        self.params = params

    @property
    def extra(self) -> torch.Tensor:
        return self.flat[self.numel :]

    @property
    def grads(self) -> torch.Tensor:
        return self.flat[: self.numel]

    def zero(self) -> None:
        self.flat.zero_()
