"""The baseline as a user would harden it for failures: ``../shared/bench/ddp_baseline.py``'s loop
(torchrun + DDP, DistributedSampler, same model, Adam) plus a checkpoint every N steps, resume from it
on start (fast-forwarding the sampler by skipping the batches already done), and progress lines.

    torchrun --max-restarts 1 --nproc-per-node 3 ddp_checkpointed.py --data F.csv --ckpt DIR --progress FILE

Rank 0 appends JSON lines to --progress: {"event": "start", "resumed_at": step, "time": t},
{"event": "step", "step": s, "time": t} every step, and {"event": "done", ...} at the end.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--bench-dir", required=True, help="folder of ddp_baseline.py (for read_csv)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--progress", required=True)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    sys.path.insert(0, a.bench_dir)
    from ddp_baseline import read_csv

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    log = open(a.progress, "a") if rank == 0 else None

    def emit(**rec):
        if log:
            log.write(json.dumps({**rec, "time": time.time()}) + "\n")
            log.flush()

    x, y = read_csv(a.data)
    n_test = len(y) // 10
    train = TensorDataset(torch.from_numpy(x[n_test:]), torch.from_numpy(y[n_test:]))
    classes = int(y.max()) + 1
    model = DDP(
        nn.Sequential(
            nn.Linear(x.shape[1], a.hidden),
            nn.ReLU(),
            nn.Linear(a.hidden, a.hidden),
            nn.ReLU(),
            nn.Linear(a.hidden, classes),
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    ckpt = Path(a.ckpt) / "ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    emit(event="start", resumed_at=start)
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=a.global_batch // world, sampler=sampler, drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = len(loader)
    step = 0
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            if step < start:  # fast-forward to where the checkpoint was taken
                step += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            step += 1
            emit(event="step", step=step)
            if step % a.every == 0 and rank == 0:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, ckpt)
    dist.barrier()
    emit(event="done", steps=step, per_epoch=per_epoch)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
