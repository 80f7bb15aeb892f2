"""CLI subcommands of the export phase: ``lepton export`` and ``lepton serve``.

``add_export_commands(sub)`` registers both on the ``lepton`` subparsers; each parser sets
``handler=`` (a function taking the parsed args, returning an exit code). Handlers raise
``LeptonError`` for bad input, which ``lepton.cli`` prints as one line before exiting 2.
ONNX and ONNX Runtime are imported only when a handler writes or runs an ONNX model
(``onnx_format``); torch and FastAPI are loaded by ``import lepton`` already.
"""

from __future__ import annotations

import json

from ..api import load
from ..cli_args import split_bind
from ..console import console, out
from ..errors import LeptonError
from .pipeline import as_spec, run_export
from .report import print_report
from .serve import serve


def add_export_commands(sub) -> None:
    """Register ``lepton export`` and ``lepton serve`` on the ``lepton`` subparsers; each parser
    sets ``handler=`` (a function taking the parsed args, returning an exit code)."""
    e = sub.add_parser(
        "export",
        help="prune / quantize / export a trained run's model and report on it",
        description="Write artifacts into RUN_DIR/exports/ and a report (exports/report.json"
        " and a table): size, test metrics next to the fp32 model's, CPU latency"
        " p50/p95 at batch 1 and 64, throughput, max output difference.",
    )
    e.add_argument("run_dir", help="a completed run directory")
    e.add_argument(
        "--format",
        action="append",
        metavar="FORMAT",
        help="onnx (default), torchscript or safetensors; repeat or comma-separate for several",
    )
    e.add_argument(
        "--quantize",
        choices=["int8", "fp16", "bf16"],
        help="int8: ONNX Runtime quantization (onnx only); fp16/bf16: 16-bit weights",
    )
    # no argparse defaults for the two options that refine another one: None tells "not given" apart
    # from a value given without the option it refines, which is an error, not silently ignored
    e.add_argument(
        "--int8-method",
        choices=["auto", "static", "dynamic"],
        help="with --quantize int8. static: activation scales calibrated on the run's training rows"
        " (fast convolutions); dynamic: activations quantized at run time; auto (default):"
        " static for convolutional classifiers, dynamic otherwise",
    )
    e.add_argument(
        "--prune",
        type=float,
        metavar="AMOUNT",
        help="fraction (0..1) of Linear/Conv weights to set to zero by L1 magnitude",
    )
    e.add_argument(
        "--prune-scope",
        choices=["global", "layer"],
        help="with --prune. global: smallest weights over all layers (default); layer: AMOUNT of each layer",
    )
    e.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune the pruned model for N epochs on the run's training split (a distributed"
        " run in RUN_DIR/exports/finetune/; the zeros stay zero)",
    )
    e.add_argument(
        "--finetune-workers",
        type=int,
        metavar="N",
        help="worker processes of the fine-tune (default: the run's cluster.workers)",
    )
    e.add_argument(
        "--latency-runs",
        type=int,
        default=200,
        metavar="N",
        help="timed calls per batch size in the report (default 200; 0 skips timing)",
    )
    e.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    e.set_defaults(handler=cmd_export)

    s = sub.add_parser(
        "serve",
        help="serve predictions over HTTP from a run or an exported model",
        description='POST /v1/predict {"rows": [{column: value, ...}]} → predictions;'
        " GET /healthz. Input is validated against the model's feature columns.",
    )
    s.add_argument(
        "target", help="run directory, or an exported file such as RUN_DIR/exports/model.int8.onnx"
    )
    s.add_argument(
        "--bind", default="127.0.0.1:8000", help="HOST:PORT (port 0 picks a free one; default %(default)s)"
    )
    s.add_argument(
        "--max-body",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest request body accepted (default 1 MiB; larger gets 413)",
    )
    s.set_defaults(handler=cmd_serve)


def cmd_export(a) -> int:
    if a.int8_method is not None and a.quantize != "int8":
        raise LeptonError(
            f"--int8-method {a.int8_method} applies only with --quantize int8"
            f" (got {'--quantize ' + a.quantize if a.quantize else 'no --quantize'})"
        )
    if a.prune_scope is not None and a.prune is None:
        raise LeptonError(f"--prune-scope {a.prune_scope} applies only with --prune AMOUNT")
    # the rules that tie options together, worded with the flags (ExportSpec words them as job keys)
    # (a value out of range is left to the spec's check, which names it)
    if a.finetune_epochs > 0 and a.prune is None:
        raise LeptonError("--finetune-epochs fine-tunes a pruned model: give --prune too (e.g. --prune 0.5)")
    if (a.finetune_workers or 0) > 0 and a.finetune_epochs == 0:
        raise LeptonError("--finetune-workers applies to a fine-tune: give --finetune-epochs too")
    formats = [f.strip() for f in ",".join(a.format or ["onnx"]).split(",") if f.strip()]
    if not formats:
        raise LeptonError("--format: give at least one of onnx, torchscript, safetensors")
    if a.quantize == "int8" and set(formats) != {"onnx"}:
        raise LeptonError(
            f"--quantize int8 is done by ONNX Runtime quantization and needs --format onnx (got"
            f" {', '.join(dict.fromkeys(formats))}); torchscript and safetensors take fp16 or bf16"
        )
    raw = {
        "format": formats,
        "quantize": a.quantize,
        "int8_method": a.int8_method or "auto",
        "prune": a.prune,
        "prune_scope": a.prune_scope or "global",
        "finetune_epochs": a.finetune_epochs,
        "finetune_workers": a.finetune_workers,
        "latency_runs": a.latency_runs,
    }
    spec = as_spec(raw, source="", names={k: "--" + k.replace("_", "-") for k in raw})

    def log(msg: str) -> None:
        console.print(msg, markup=False, highlight=False)

    report = run_export(a.run_dir, spec, log=None if a.json else log, progress=not a.json)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print_report(report, out)
    return 0


def cmd_serve(a) -> int:
    if a.max_body <= 0:
        raise LeptonError(f"--max-body {a.max_body}: must be a positive number of bytes")
    host, port = split_bind(a.bind)
    return serve(load(a.target), a.target, host, port, a.max_body)
