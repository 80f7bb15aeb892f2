"""Model optimisation and export: prune, quantise, export (ONNX / TorchScript / safetensors), check, serve.

    from lepton.export import ExportSpec, run_export, load_artifact
    report = run_export("runs/x", {"format": "onnx", "quantize": "int8"})
    p = load_artifact("runs/x/exports/model.int8.onnx")

Modules: ``spec`` (ExportSpec, pydantic only), ``pipeline`` (run_export), ``artifacts`` (writers,
``load_artifact``), ``onnx_format`` (torch → ONNX, int8/fp16/bf16), ``prune``, ``report``, ``serve``
(``lepton serve``), ``cli`` (``lepton export`` / ``lepton serve`` argument parsing).

Only ``ExportSpec`` is imported eagerly: ``lepton.spec`` may use it as a field type, and importing this
package must not pull in torch, ONNX or ONNX Runtime.
"""
from __future__ import annotations

from .spec import ExportSpec

__all__ = ["ExportSpec", "run_export", "load_artifact"]


def __getattr__(name: str):
    if name == "run_export":
        from .pipeline import run_export
        return run_export
    if name == "load_artifact":
        from .artifacts import load_artifact
        return load_artifact
    raise AttributeError(f"module 'lepton.export' has no attribute {name!r}")
