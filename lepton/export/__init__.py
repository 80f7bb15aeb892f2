"""Model optimisation and export: prune, quantise, export (ONNX / TorchScript / safetensors), check, serve.

    from lepton.export import ExportSpec, run_export, load_artifact
    report = run_export("runs/x", {"format": "onnx", "quantize": "int8"})
    p = load_artifact("runs/x/exports/model.int8.onnx")

Modules: ``pipeline`` (run_export), ``artifacts`` (writers, ``ArtifactPredictor``, ``load_artifact``),
``onnx_format`` (torch → ONNX, int8/fp16/bf16), ``prune``, ``report``, ``serve`` (``lepton serve``),
``cli`` (``lepton export`` / ``lepton serve`` argument parsing). ``ExportSpec`` lives in
``lepton.spec`` (a job's ``export:`` section) and is re-exported here.

ONNX and ONNX Runtime are imported only when an ONNX model is written or run.
"""

from __future__ import annotations

from ..spec import ExportSpec
from .artifacts import load_artifact
from .pipeline import run_export

__all__ = ["ExportSpec", "run_export", "load_artifact"]
