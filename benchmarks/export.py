"""Export benchmark: the int8 ONNX artifact against the fp32 model it came from.

    .venv/bin/python benchmarks/export.py [--work /tmp/lepton-export-bench] [--rows 50000] [--runs 500]

Models: the bundled examples (breast-cancer MLP, digits CNN) and the throughput benchmark's MLP
(in → 256 → 256 → 10 on 64 features, trained on ``ddp_baseline.py --write-data`` rows). Each is trained
here with `lepton.train` (2 workers; ``--reuse`` keeps a completed run) and exported with
``run_export(format=onnx, quantize=int8)``; its report table is printed, then one line per target:
- size: the int8 file vs the fp32 model's weights file (model/weights.safetensors) and vs the fp32 ONNX
  file; target: at least 3.5x smaller;
- accuracy: test-split accuracy drop of int8 vs the fp32 torch model; target: at most 1 point;
- latency: batch-1 p50 of int8 under ONNX Runtime vs the fp32 eager torch model; target: lower.
Everything is measured in this invocation, on this machine (same thread count for torch and ONNX
Runtime); nothing is assumed. A JSON summary goes to WORK/export_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from throughput import add_bench_dir, check_bench_dir, synthetic_data  # noqa: E402

import lepton  # noqa: E402
from lepton.export import run_export  # noqa: E402
from lepton.export.report import report_table  # noqa: E402

SIZE_TARGET, ACC_TARGET_PT = 3.5, 1.0


def mlp_job(data: Path, epochs: int) -> dict:
    """The throughput benchmark's job (benchmarks/throughput.py), with a test split to score on."""
    return {
        "name": "throughput-mlp",
        "seed": 0,
        "task": "classification",
        "data": {
            "path": str(data),
            "target": "label",
            "split": {"train": 0.9, "val": 0.0, "test": 0.1},
            "preprocess": {"missing": "drop", "dedupe": False, "normalize": "none"},
        },
        "model": {
            "type": "mlp",
            "layers": [{"units": 256, "activation": "relu"}, {"units": 256, "activation": "relu"}],
        },
        "train": {
            "epochs": epochs,
            "batch_size": 512,
            "optimizer": {"name": "adam", "lr": 0.001},
            "log_every_steps": 50,
        },
        "eval": {"every": "never"},
        "checkpoint": {"every_steps": 0},
    }


def train(job, run_dir: Path, reuse: bool, overrides: list[str] | None = None) -> float:
    if reuse and (run_dir / "model" / "lepton.json").exists():
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = lepton.train(job, workers=2, run_dir=run_dir, overrides=overrides)
    if res.status != "completed":
        sys.exit(f"training {run_dir} {res.status}: {res.reason}")
    return time.perf_counter() - t0


def targets(report: dict) -> dict:
    rows = {r["name"]: r for r in report["rows"]}
    eager, onnx32, int8 = report["rows"][0], rows["model.onnx"], rows["model.int8.onnx"]
    return {
        "size_x_vs_weights": eager["size_bytes"] / int8["size_bytes"],
        "size_x_vs_fp32_onnx": onnx32["size_bytes"] / int8["size_bytes"],
        "acc_fp32": eager["metrics"]["accuracy"],
        "acc_int8": int8["metrics"]["accuracy"],
        "acc_drop_pt": (eager["metrics"]["accuracy"] - int8["metrics"]["accuracy"]) * 100,
        "b1_p50_ms_eager": eager["latency_ms"]["batch_1"]["p50"],
        "b1_p50_ms_int8": int8["latency_ms"]["batch_1"]["p50"],
        "b1_p50_ms_fp32_onnx": onnx32["latency_ms"]["batch_1"]["p50"],
        "b64_rows_s_eager": eager["throughput_rows_s"],
        "b64_rows_s_int8": int8["throughput_rows_s"],
        "int8_bytes": int8["size_bytes"],
        "weights_bytes": eager["size_bytes"],
        "fp32_onnx_bytes": onnx32["size_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lepton-export-bench"))
    ap.add_argument("--rows", type=int, default=50_000, help="rows of the throughput MLP's synthetic set")
    ap.add_argument("--mlp-epochs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=500, help="timed calls per batch size")
    ap.add_argument("--reuse", action="store_true", help="keep completed runs from an earlier invocation")
    add_bench_dir(ap)
    a = ap.parse_args()
    check_bench_dir(a.bench_dir, "ddp_baseline.py")
    a.work.mkdir(parents=True, exist_ok=True)
    con = Console(width=170)

    data = synthetic_data(a.work, a.bench_dir, a.rows)
    models = [
        ("breast-cancer-mlp", str(REPO / "examples" / "breast_cancer_mlp.yaml")),
        ("digits-cnn", str(REPO / "examples" / "digits_cnn.yaml")),
        ("throughput-mlp", mlp_job(data, a.mlp_epochs)),
    ]
    summary = {}
    for name, job in models:
        run_dir = a.work / name
        wall = train(job, run_dir, a.reuse)
        print(f"{name}: trained in {wall:.1f} s" if wall else f"{name}: reusing {run_dir}", flush=True)
        report = run_export(run_dir, {"format": "onnx", "quantize": "int8", "latency_runs": a.runs})
        con.print(report_table(report))
        summary[name] = targets(report)

    print(
        f"\ntargets (int8 ONNX vs fp32; {a.runs} timed calls per batch size, "
        f"{summary and report['threads']} threads)"
    )
    print(
        f"{'model':<20}{'x smaller (weights / onnx)':>28}{'acc fp32 → int8':>20}{'drop pt':>9}"
        f"{'b1 p50 ms eager → int8':>26}   verdict"
    )
    for name, t in summary.items():
        ok_size = t["size_x_vs_weights"] >= SIZE_TARGET
        ok_acc = t["acc_drop_pt"] <= ACC_TARGET_PT
        ok_lat = t["b1_p50_ms_int8"] < t["b1_p50_ms_eager"]
        verdict = " ".join(
            f"{k}:{'ok' if v else 'MISS'}"
            for k, v in (("size", ok_size), ("acc", ok_acc), ("latency", ok_lat))
        )
        print(
            f"{name:<20}{t['size_x_vs_weights']:>15.2f} / {t['size_x_vs_fp32_onnx']:<10.2f}"
            f"{t['acc_fp32']:>10.4f} → {t['acc_int8']:.4f}{t['acc_drop_pt']:>+9.2f}"
            f"{t['b1_p50_ms_eager']:>15.4f} → {t['b1_p50_ms_int8']:.4f}   {verdict}"
        )
        t.update(size_ok=ok_size, acc_ok=ok_acc, latency_ok=ok_lat)
    (a.work / "export_benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {a.work / 'export_benchmark.json'}")


if __name__ == "__main__":
    main()
