"""TensorBoard event files in ``RUN_DIR/tensorboard/``, written by the coordinator from the metric
records workers send, when the optional ``tensorboard`` package is installed (``pip install
lepton[tensorboard]``); without it this is a no-op."""
from __future__ import annotations

import math
from pathlib import Path


class TensorBoardSink:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:                 # the optional extra is not installed
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def record(self, rec: dict) -> None:
        if self.writer is None:
            return
        kind, step = rec.get("kind"), rec.get("step")
        if kind == "train":
            prefix = "train"
            values = {k: rec.get(k) for k in ("loss", "samples_per_s", "lr")}
        elif kind == "eval":
            prefix = rec["split"]
            values = {k: v for k, v in rec.items() if k not in ("kind", "split", "time", "step", "epoch", "count")}
        else:
            return
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{name}", v, step, walltime=rec.get("time"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
