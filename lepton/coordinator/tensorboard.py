"""TensorBoard event files in ``RUN_DIR/tensorboard/``, written by the coordinator from the metric
records workers send, when the optional ``tensorboard`` package is installed (``pip install
lepton[tensorboard]``); without it this is a no-op."""

from __future__ import annotations

import math
from pathlib import Path

from ..protocol import typed_record
from ..records import EvalRecord, TrainRecord


class TensorBoardSink:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def record(self, line: dict) -> None:
        if self.writer is None:
            return
        rec = typed_record(line)
        if isinstance(rec, TrainRecord):
            prefix, values = "train", {"loss": rec.loss, "samples_per_s": rec.samples_per_s, "lr": rec.lr}
        elif isinstance(rec, EvalRecord):
            prefix, values = rec.split, {k: v for k, v in rec.metrics.items() if k != "count"}
        else:
            return
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{name}", v, rec.step, walltime=rec.time)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
