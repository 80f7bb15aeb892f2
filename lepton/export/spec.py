"""``ExportSpec``: the options of the export phase, shared by ``lepton export`` and a job's ``export:``.

    export:
      format: onnx                 # or a list: [onnx, torchscript, safetensors]
      quantize: int8               # int8 (onnx only) | fp16 | bf16; omit for fp32
      int8_method: auto            # auto (static for convolutional classifiers) | static | dynamic
      prune: 0.5                   # fraction of Linear/Conv weights set to zero (L1 magnitude)
      prune_scope: global          # global (over all layers) | layer (the fraction of each layer)
      finetune_epochs: 2           # fine-tune the pruned model (a distributed run; keeps the sparsity)
      finetune_workers: 2          # its worker processes (default: the run's cluster.workers)
      latency_runs: 200            # timed calls per batch size in the report

This module imports only pydantic so that ``lepton.spec`` can use ``ExportSpec`` as a field type
without importing torch, ONNX or ONNX Runtime.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Format = Literal["onnx", "torchscript", "safetensors"]
Quantize = Literal["int8", "fp16", "bf16"]


class ExportSpec(BaseModel):
    """Validated export options; an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    format: list[Format] = Field(
        default_factory=lambda: ["onnx"], description="artifact format(s): onnx, torchscript, safetensors")
    quantize: Optional[Quantize] = Field(
        None, description="int8: ONNX Runtime quantization (onnx only); fp16/bf16: 16-bit weights")
    int8_method: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="static: activation scales calibrated on training rows (fast convolutions);"
                            " dynamic: activations quantized at run time; auto: static for convolutional classifiers")
    prune: Optional[float] = Field(
        None, gt=0, lt=1, description="fraction of Linear/Conv weights to zero by L1 magnitude")
    prune_scope: Literal["global", "layer"] = "global"
    finetune_epochs: int = Field(0, ge=0, description="epochs of fine-tuning after pruning (a distributed run)")
    finetune_workers: Optional[int] = Field(
        None, gt=0, description="worker processes of the fine-tune (default: the run's cluster.workers)")
    latency_runs: int = Field(200, ge=0, description="timed calls per batch size in the report (0: no timing)")

    @field_validator("format", mode="before")
    @classmethod
    def _split(cls, v):
        # a single name, and "onnx,torchscript" on the command line, are the same as a YAML list
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.formats:
            raise ValueError("format: give at least one of onnx, torchscript, safetensors")
        if self.quantize == "int8" and self.formats != ["onnx"]:
            raise ValueError("quantize int8 is done by ONNX Runtime quantization and needs format onnx"
                             f" (got {', '.join(self.formats)}); torchscript and safetensors take fp16 or bf16")
        if self.finetune_epochs and self.prune is None:
            raise ValueError("finetune_epochs fine-tunes a pruned model: give prune too (e.g. prune: 0.5)")
        if self.finetune_workers and not self.finetune_epochs:
            raise ValueError("finetune_workers applies to a fine-tune: give finetune_epochs too")
        return self

    @property
    def formats(self) -> list[str]:
        """The formats in the order given, without repeats."""
        return list(dict.fromkeys(self.format))

    @property
    def precision(self) -> str:
        return self.quantize or "fp32"
