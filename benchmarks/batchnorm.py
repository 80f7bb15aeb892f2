"""The cost of BatchNorm over the global batch (`model.batch_norm: global`) against per-worker BatchNorm.

    .venv/bin/python benchmarks/batchnorm.py [--rounds 3] [--epochs 20] [--batch 64]
        [--work /tmp/lepton-bench-bn]

A small CNN with three BatchNorm layers (conv 16 → BN → ReLU → conv 32 → BN → ReLU → pool → dense 64 →
BN → ReLU → dense 10) on the bundled 8x8 digits, Adam, one torch thread per worker, all run in this
invocation with `lepton.train`:
- 2 workers, `batch_norm: global` (every BatchNorm forward and backward is a collective);
- 2 workers, `batch_norm: local` (torch's BatchNorm on each worker's slice: DDP's behaviour without
  SyncBatchNorm, whose statistics depend on the split);
- 1 worker (torch's BatchNorm; global and local are the same model there).
Samples/s is each run's training-loop figure (summary.json, steady state). Every run is repeated
``--rounds`` times, interleaved; the table shows medians, and the ratio global / local is the price of
invariant 1 for such a model. No target: the figure documents the cost.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from statistics import median

from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from throughput import interleaved  # noqa: E402

import lepton  # noqa: E402


def bn_cnn(input_shape, num_outputs):
    """Biases before a BatchNorm are left out (BatchNorm cancels them)."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (input_shape[1] // 2) * (input_shape[2] // 2), 64, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, num_outputs),
    )


def job(epochs: int, batch: int, mode: str) -> dict:
    return {
        "name": f"bn-{mode}",
        "seed": 0,
        "task": "classification",
        "data": {
            "path": str(REPO / "examples" / "data" / "digits.csv"),
            "target": "digit",
            "shape": [1, 8, 8],
            "split": {"train": 0.8, "val": 0.1, "test": 0.1},
            "preprocess": {"missing": "drop", "dedupe": False, "normalize": "minmax"},
        },
        "model": {"type": "factory", "factory": bn_cnn, "batch_norm": mode},
        "train": {
            "epochs": epochs,
            "batch_size": batch,
            "optimizer": {"name": "adam", "lr": 0.003},
            "log_every_steps": 1000,
        },
        "eval": {"every": "never"},
        "checkpoint": {"every_steps": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="every run this many times, interleaved; medians")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lepton-bench-bn"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)

    def train(mode: str, workers: int):
        def fn() -> tuple[float, float]:
            run_dir = a.work / f"{mode}-{workers}"
            shutil.rmtree(run_dir, ignore_errors=True)
            res = lepton.train(job(a.epochs, a.batch, mode), workers=workers, run_dir=run_dir, threads=1)
            if res.status != "completed":
                sys.exit(f"{run_dir}: {res.status}: {res.reason}")
            return res.summary["samples_per_s"], res.summary["test"]["accuracy"]

        return fn

    runs = {"global x2": train("global", 2), "local x2": train("local", 2), "x1": train("global", 1)}
    got = interleaved(runs, a.rounds)
    med = {name: median(r[0] for r in rs) for name, rs in got.items()}
    print(f"\n{'run':<12}{'samples/s':>12}{'test acc':>10}   (global batch {a.batch}, {a.epochs} epochs)")
    for name, rs in got.items():
        print(f"{name:<12}{med[name]:>12,.0f}{rs[0][1]:>10.4f}")
    print(f"\nglobal x2 / local x2 samples/s   {med['global x2'] / med['local x2']:.2f}")
    print(f"global x2 / x1 samples/s         {med['global x2'] / med['x1']:.2f}")


if __name__ == "__main__":
    main()
