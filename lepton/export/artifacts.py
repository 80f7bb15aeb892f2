"""Exported artifacts: writing them in each format, and loading any of them for prediction.

    from lepton.export.artifacts import load_artifact
    p = load_artifact("runs/x/exports/model.int8.onnx")     # raw rows in, like lepton.load(RUN_DIR)
    p.predict_file("new.csv"); p.predict_rows([{...}]); p.write_csv(result, "out.csv")

Formats (file name ``model[.pruned][.PRECISION].EXT``):
- ``onnx`` (``.onnx``): run by ONNX Runtime; fp32, int8 (static or dynamic quantization), fp16/bf16 (weights
  stored in 16 bits, computed in float32; see ``onnx_format``);
- ``torchscript`` (``.torchscript``): a traced ``torch.jit`` module in fp32/fp16/bf16, computed in that
  dtype. Recent torch (2.13 here) deprecates ``torch.jit``: it is offered because the issue asks for it,
  the export report repeats torch's deprecation message, and ONNX is the recommended shipping format;
- ``safetensors`` (``.safetensors``): the weights only (fp32/fp16/bf16), the model is rebuilt from the
  embedded model spec, like ``lepton.load`` does; computed in the stored dtype.
Every artifact embeds the run's model description (``meta``), so a file works without its run directory
(except a safetensors file of a model built by a pickled Python callable, which needs the run's
``model/model_factory.pkl`` next to its ``exports/`` folder).

``load_artifact`` returns an ``ArtifactPredictor``: a ``lepton.predict.Predictor`` (same
``predict_file/predict_rows/predict_table/predict_array/write_csv``) whose forward pass is the artifact's;
``lepton.load`` calls it for a file.
Every problem with the file (missing, corrupt, not from Lepton) is a ``LeptonError`` naming it.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Callable

import cloudpickle
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from ..errors import LeptonError, first_line
from ..model.builders import build_model, num_outputs
from ..predict import Predictor, load_weights
from ..spec import parse_job
from ..storage.preprocess import Preprocessor
from ..storage.rundir import atomic_write_bytes
from .meta import META_KEY, decode_meta, encode_meta
from .onnx_format import OnnxRunner

FORMATS = ("onnx", "torchscript", "safetensors")
EXTENSIONS = {"onnx": ".onnx", "torchscript": ".torchscript", "safetensors": ".safetensors"}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Runner = Callable[[np.ndarray], np.ndarray]


def artifact_name(fmt: str, precision: str, pruned: bool) -> str:
    return (
        "model"
        + (".pruned" if pruned else "")
        + ("" if precision == "fp32" else f".{precision}")
        + EXTENSIONS[fmt]
    )


def detect_format(path: Path) -> str:
    """By extension, else by the first bytes (a TorchScript file is a zip; safetensors starts with an
    8-byte header length then ``{``; anything else is tried as an ONNX protobuf)."""
    for fmt, ext in EXTENSIONS.items():
        if path.name.endswith(ext):
            return fmt
    if path.suffix == ".pt":
        return "torchscript"
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "torchscript"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "onnx"


# --- writing ---------------------------------------------------------------------------------------


def write_torchscript(
    model: nn.Module, input_shape: tuple[int, ...], precision: str, meta: dict, path: Path
) -> list[str]:
    """Trace ``model`` in ``precision`` and save it with the description; returns notes for the report
    (torch's deprecation message of torch.jit, when it gives one)."""
    dtype = TORCH_DTYPES[precision]
    m = _copy_as(model, dtype)
    example = torch.zeros((2,) + tuple(input_shape), dtype=dtype)
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(m, example)
        except Exception as e:  # tracing raises many types for models it cannot follow
            raise LeptonError(f"TorchScript tracing of the model failed: {first_line(e)}") from None
        torch.jit.save(traced, buf, _extra_files={META_KEY: encode_meta(meta)})
    atomic_write_bytes(path, buf.getvalue())
    deprecated = sorted({str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)})
    return [f"torchscript: {deprecated[0]} (onnx is the maintained shipping format)"] if deprecated else []


def write_safetensors(model: nn.Module, precision: str, meta: dict, path: Path) -> None:
    dtype = TORCH_DTYPES[precision]
    tensors = {
        k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: encode_meta(meta)}))


def write_onnx(proto, path: Path) -> None:
    atomic_write_bytes(path, proto.SerializeToString())


def _copy_as(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(dtype).eval()


# --- running ---------------------------------------------------------------------------------------


class TorchRunner:
    """float32 features → float32 outputs through a torch module computing in ``dtype``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        self.model, self.dtype = model.eval(), dtype

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:  # e.g. a memory-mapped cache: torch wants writable memory
            x = x.copy()
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.dtype))
        return out.float().numpy()


def rebuild_torch_model(meta: dict, source: Path) -> nn.Module:
    """The model of ``meta`` built the way ``lepton.load`` builds it (seeded, spec'd layers)."""
    factory = None
    if meta["model"].get("type") == "factory":
        pickled = source.parent.parent / "model" / "model_factory.pkl"
        if pickled.exists():
            factory = cloudpickle.loads(pickled.read_bytes())
    pre = Preprocessor.from_dict(meta["preprocess"])
    job = parse_job(
        {
            "name": meta.get("name", "model"),
            "seed": meta.get("seed", 0),
            "task": meta["task"],
            "data": {"path": "-", "target": pre.target, "shape": pre.shape},
            "model": meta["model"],
        },
        source=f"{source} (embedded model spec)",
    )
    try:
        return build_model(
            job, tuple(meta["input_shape"]), num_outputs(meta["task"], meta["classes"]), factory
        )
    except LeptonError as e:
        raise LeptonError(
            f"{source}: cannot rebuild the model from its embedded spec ({e}); a model built by"
            " a Python callable needs its run's model/model_factory.pkl next to exports/, or"
            " ship it as onnx or torchscript, which carry the whole graph"
        ) from None


def _load_onnx(path: Path, threads: int | None) -> tuple[Runner, dict]:
    r = OnnxRunner(path, threads)
    return r, r.meta


def _load_torchscript(path: Path) -> tuple[Runner, dict]:
    extra = {META_KEY: ""}
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated upstream; the export report already said so once
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:  # RuntimeError from the zip reader / unpickler, for any damage
        raise LeptonError(f"{path}: not a readable TorchScript file ({first_line(e)})") from None
    meta = decode_meta(extra[META_KEY], str(path))
    return TorchRunner(module, TORCH_DTYPES[meta["artifact"].get("precision", "fp32")]), meta


def _load_safetensors(path: Path) -> tuple[Runner, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = decode_meta((f.metadata() or {}).get(META_KEY), str(path))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except LeptonError:
        raise
    except Exception as e:  # SafetensorError (header/size mismatch), OSError
        raise LeptonError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    dtype = TORCH_DTYPES[meta["artifact"].get("precision", "fp32")]
    model = rebuild_torch_model(meta, path).to(dtype)
    load_weights(model, state, path, "the embedded model spec")
    return TorchRunner(model, dtype), meta


_LOADERS = {"torchscript": _load_torchscript, "safetensors": _load_safetensors}


class ArtifactPredictor(Predictor):
    """A ``Predictor`` whose forward pass is an exported artifact (see module doc)."""

    def __init__(self, path: Path, runner: Runner, meta: dict):
        super().__init__(path, meta)
        self.runner = runner
        self.format = meta["artifact"]["format"]
        self.precision = meta["artifact"].get("precision", "fp32")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The artifact's forward pass (``Predictor.predict_array`` checks ``x`` and reads the output)."""
        return self.runner(x)

    def describe(self) -> dict:
        return {
            "source": str(self.path),
            "format": self.format,
            "precision": self.precision,
            "task": self.task,
        }


def load_artifact(path: str | Path, threads: int | None = None) -> ArtifactPredictor:
    """A predictor from an exported file (``.onnx``, ``.torchscript``, ``.safetensors``)."""
    p = Path(path)
    if not p.exists():
        raise LeptonError(f"{p}: no such exported model file")
    if not p.is_file():
        raise LeptonError(f"{p}: not a file (give an exported model such as RUN_DIR/exports/model.onnx)")
    if p.stat().st_size == 0:
        raise LeptonError(f"{p}: empty file (not an exported model)")
    fmt = detect_format(p)
    # only ONNX Runtime takes a thread count; torch runs on the process's torch.get_num_threads()
    runner, meta = _load_onnx(p, threads) if fmt == "onnx" else _LOADERS[fmt](p)
    if meta["artifact"].get("format") != fmt:
        raise LeptonError(f"{p}: file is {fmt} but its metadata says {meta['artifact'].get('format')}")
    return ArtifactPredictor(p, runner, meta)


__all__ = [
    "ArtifactPredictor",
    "FORMATS",
    "artifact_name",
    "load_artifact",
    "rebuild_torch_model",
    "write_onnx",
    "write_safetensors",
    "write_torchscript",
    "TorchRunner",
]
