"""ONNX artifacts: export from torch, int8 / fp16 / bf16 compression, and running them with ONNX Runtime.

Contracts:
- ``export_onnx(model, input_shape, meta)`` returns a self-contained ``ModelProto``: one float32 input
  ``input`` of shape ``(batch, *input_shape)`` with a dynamic batch axis, one float32 output ``output``
  of shape ``(batch, outputs)``, and the Lepton model description (preprocessing, classes, task) stored
  in the model metadata (``meta.META_KEY``) so the file can be shipped and served on its own.
- ``quantize_int8`` goes through ONNX Runtime's quantization tool, *static* or *dynamic* (``int8_method``):
  static (``quantize_static``, QOperator format) stores int8 weights and runs uint8 activations whose
  scales were calibrated on training rows, so convolutions run as ``QLinearConv``; dynamic
  (``quantize_dynamic``) stores int8 weights and quantizes activations per batch at run time, needing no
  calibration rows, but its convolutions run as ``ConvInteger``, which ONNX Runtime's CPU provider
  computes ~10x slower than float ``Conv`` at batch 64 (digits CNN: 1.09 ms against 0.27 static and
  0.09 fp32). ``auto`` follows ONNX Runtime's advice: static for a classifier with convolutions,
  dynamic otherwise (``int8_method``). One scale per tensor either way. Input and output stay float32.
- ``store_weights_as(proto, "fp16"|"bf16")`` stores every float initializer in 16 bits and adds a
  ``Cast`` back to float32 in front of its users: the file halves, the arithmetic stays float32
  (ONNX Runtime's CPU provider has no fp16/bf16 Gemm/Conv kernels, so a true 16-bit graph would not run
  everywhere; the 16-bit *rounding* of the weights is what the report measures).
- ``OnnxRunner(path)`` maps a float32 array to the output array; a file that is not a readable ONNX
  model is a ``LeptonError`` naming it.

``onnx`` and ``onnxruntime`` are imported inside the functions that use them, on purpose: importing
them costs start-up time in every ``lepton`` command and worker process, and only the export phase
and ONNX artifacts need them.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, cast

import numpy as np
import torch

from ..errors import LeptonError, first_line
from .meta import META_KEY, decode_meta, encode_meta

INPUT_NAME = "input"
OUTPUT_NAME = "output"
# The torch.export-based exporter's default opset in torch 2.13; ONNX Runtime >= 1.17 runs it.
OPSET = 20


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision-not-installed registry warnings, a pytree
    FutureWarning from torch itself): the user sees our one-line stages instead."""
    lg = logging.getLogger("torch.onnx")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        lg.setLevel(level)


def _strip(proto) -> None:
    """Drop what only debugging needs: the exporter's per-node/per-value metadata (source names, stack
    traces) and intermediate shapes. On a small model they weigh more than the weights, and they
    would make every size comparison in the report about metadata instead of parameters."""
    g = proto.graph
    for coll in (g.node, g.input, g.output, g.value_info, g.initializer):
        for item in coll:
            if hasattr(item, "metadata_props"):
                del item.metadata_props[:]
            if hasattr(item, "doc_string"):
                item.doc_string = ""
    del g.value_info[:]  # ONNX Runtime infers intermediate shapes when it loads the model
    del g.metadata_props[:]  # the exporter's graph signature (~500 bytes of text)
    del proto.metadata_props[:]
    # quant_pre_process declares every domain ONNX Runtime knows; keep the ones the nodes use
    used = {n.domain for n in g.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    _compact_names(g)


def _compact_names(g) -> None:
    """Short names for nodes and internal tensors (``t0``, ``t1``...): the exporter's and quantizer's
    names ("7.weight_Transposed_quantized") cost ~100 bytes per node, a tenth of a small int8 model.
    The graph's input and output keep their names (they are the interface). Graphs with subgraphs
    (If/Loop from a custom factory model) are left alone: their inner names would need renaming too."""
    from onnx import AttributeProto

    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in g.initializer:
        init.name = short(init.name)
    for n in g.node:
        n.name = ""
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]


def set_meta(proto, meta: dict) -> None:
    """Store the Lepton description in the model's metadata (replacing any earlier one)."""
    keep = [p for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, encode_meta(meta)
    proto.producer_name = "lepton"


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], meta: dict):
    """float32 ``model`` → ONNX ModelProto with a dynamic batch axis (torch.export-based exporter)."""
    model = model.eval()
    # batch 2 in the example: torch.export specialises sizes 0 and 1, so a batch-1 example could pin
    # the batch axis to 1 for some models
    example = (torch.zeros((2,) + tuple(input_shape), dtype=torch.float32),)
    batch = torch.export.Dim("batch")
    try:
        with _quiet():
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; the user needs the first line
        raise LeptonError(f"ONNX export of the model failed: {type(e).__name__}: {first_line(e)}") from None
    proto = cast(torch.onnx.ONNXProgram, program).model_proto  # dynamo=True always returns a program
    _strip(proto)
    set_meta(proto, meta)
    return proto


def int8_method(proto, requested: str, calibration_rows: int, task: str) -> str:
    """The method ``quantize_int8`` will use: ``auto`` is static for a classifier with convolutions
    (ONNX Runtime's advice for CNNs) when there are rows to calibrate on, else dynamic. Not for
    regression: static quantization clips every activation, the output included, to the range seen
    on the calibration rows, and a regression output beyond the training targets would come out
    clipped (a classifier's logits clipped at the top of their range keep their order but for ties,
    which the report's accuracy and agreement columns measure)."""
    if requested != "auto":
        return requested
    has_conv = any(n.op_type == "Conv" for n in proto.graph.node)
    return "static" if has_conv and calibration_rows > 0 and task == "classification" else "dynamic"


def quantize_int8(proto, meta: dict, method: str = "dynamic", calibration=None):
    """int8 ``proto`` through ONNX Runtime's maintained quantization tool (module doc). ``method`` is
    "static" or "dynamic"; static calibrates activation ranges (min/max) on ``calibration``, a float32
    array of model inputs (``(rows, *input_shape)``)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Rows(CalibrationDataReader):
        def __init__(self, x):
            self.batches = iter(
                [
                    {INPUT_NAME: np.ascontiguousarray(x[i : i + 64], dtype=np.float32)}
                    for i in range(0, len(x), 64)
                ]
            )

        def get_next(self):
            return next(self.batches, None)

    if method == "static" and (calibration is None or not len(calibration)):
        raise ValueError("static int8 quantization needs calibration rows")
    with tempfile.TemporaryDirectory(prefix="lepton-int8-") as d:
        src, pre, dst = Path(d) / "fp32.onnx", Path(d) / "pre.onnx", Path(d) / "int8.onnx"
        onnx.save(proto, str(src))
        with _quiet():
            # shape inference + graph clean-up first, as ONNX Runtime recommends before quantizing
            quant_pre_process(str(src), str(pre))
            # per-tensor scales: on these small layers per-channel scales cost bytes (one float per
            # output channel) without a measurable accuracy gain; QInt8 weights with uint8 activations
            # is ORT's recommended default on x86 and ARM
            if method == "static":
                # QOperator (QLinearConv, QLinearMatMul...) rather than QDQ: the same kernels here, and
                # no Quantize/Dequantize pair around every tensor (digits CNN: 930 bytes, 5% of the file)
                quantize_static(
                    str(pre),
                    str(dst),
                    Rows(calibration),
                    quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=False,
                )
            else:
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=False)
        q = onnx.load(str(dst))
    _strip(q)
    set_meta(q, meta)
    return q


def store_weights_as(proto, precision: str, meta: dict):
    """A copy of ``proto`` whose float initializers are stored as fp16 or bf16 (see module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in ("fp16", "bf16"):
        raise ValueError(precision)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    kept, casts = [], []
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        a = numpy_helper.to_array(init)
        name16 = f"{init.name}__{precision}"
        if precision == "fp16":
            t16 = numpy_helper.from_array(a.astype(np.float16), name16)
        else:  # numpy has no bfloat16: round through torch (round-to-nearest-even) and keep the bits
            bits = torch.tensor(a).to(torch.bfloat16).view(torch.int16).numpy()
            t16 = helper.make_tensor(name16, TensorProto.BFLOAT16, list(a.shape), bits.tobytes(), raw=True)
        kept.append(t16)
        casts.append(
            helper.make_node("Cast", [name16], [init.name], to=TensorProto.FLOAT, name=f"cast_{name16}")
        )
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = casts + list(g.node)  # the casts come first: graph nodes must be topologically sorted
    del g.node[:]
    g.node.extend(nodes)
    set_meta(out, meta)
    return out


class OnnxRunner:
    """float32 features ``(n, *input_shape)`` → float32 outputs, on ONNX Runtime's CPU provider."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: warnings about unused initializers etc. are noise
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # InvalidProtobuf, Fail, NoSuchFile... all mean "not a usable model"
            raise LeptonError(f"{path}: not a readable ONNX model ({first_line(e)})") from None
        self.meta = decode_meta(self.session.get_modelmeta().custom_metadata_map.get(META_KEY), str(path))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
