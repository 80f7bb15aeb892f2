"""The export phase: prune → fine-tune → export → compress → check, ending in ``exports/report.json``.

    from lepton.export import ExportSpec, run_export
    report = run_export("runs/x", ExportSpec(format="onnx", quantize="int8"))   # or a dict

Contract of ``run_export(run_dir, spec)``:
- reads the run's final model (``model/``) and its prepared test split (``data/test_*.npy``); a run
  without them is a ``LeptonError`` that says what is missing;
- when ``spec.prune`` is set, prunes a copy of the model (``prune.prune_model``), fine-tuning it for
  ``spec.finetune_epochs`` first (a distributed run in ``RUN_DIR/exports/finetune/``; ``progress``
  shows its bar); the run's own ``model/`` is never modified;
- writes one artifact per format into ``RUN_DIR/exports/`` (names from ``artifacts.artifact_name``,
  replaced atomically when they exist). An ONNX artifact in int8/fp16/bf16 is made from the fp32 ONNX
  export, which is written too (``model[.pruned].onnx``) so the report shows what the compression cost;
- loads every artifact back through ``load_artifact`` (what ``lepton predict``/``serve`` will run) and
  measures it against the fp32 torch model (``report`` module doc); writes ``exports/report.json`` and
  returns the same dict.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch
from pydantic import ValidationError

from ..errors import LeptonError, SpecError
from ..predict import RunPredictor
from ..spec import ExportSpec, format_validation_error
from ..storage.backend import is_url
from ..storage.checkpoint import MODEL_WEIGHTS
from ..storage.mirror import copy_run
from ..storage.rundir import EXPORTS_DIR, RunDir, atomic_write_json
from .artifacts import (
    TorchRunner,
    artifact_name,
    load_artifact,
    write_onnx,
    write_safetensors,
    write_torchscript,
)
from .meta import artifact_meta
from .onnx_format import export_onnx, int8_method, quantize_int8, store_weights_as
from .prune import prune_model
from .report import Candidate, measure

REPORT_NAME = "report.json"
REPORT_FORMAT = "lepton-export-report/1"
CALIBRATION_ROWS = 512  # static int8: rows whose activation ranges set the scales

Log = Callable[[str], None]


def as_spec(
    spec: ExportSpec | dict | None, source: str = "export", names: dict[str, str] | None = None
) -> ExportSpec:
    """``names``: how the caller calls the fields (``lepton export``'s flags), for the error line."""
    if spec is None:
        return ExportSpec()
    if isinstance(spec, ExportSpec):
        return spec
    try:
        return ExportSpec.model_validate(spec)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source, names)) from None


def _eval_split(run: RunDir) -> tuple[str, np.ndarray, np.ndarray]:
    """The test split, or the validation split when the job kept no test rows."""
    for split in ("test", "val"):
        xp, yp = run.data_dir / f"{split}_x.npy", run.data_dir / f"{split}_y.npy"
        if not (xp.is_file() and yp.is_file()):
            continue
        try:
            x, y = np.load(xp), np.load(yp)
        except (OSError, ValueError) as e:
            raise LeptonError(f"{xp}: cannot read the prepared {split} split ({e})") from None
        if len(y):
            return split, x, y
    raise LeptonError(
        f"{run.data_dir}: no prepared test (or validation) rows to check the artifacts on"
        " (expected data/test_x.npy and data/test_y.npy from `lepton train`)"
    )


def _calibration_rows(run: RunDir) -> np.ndarray | None:
    """Up to ``CALIBRATION_ROWS`` rows of the prepared training split, evenly spread (the split is in
    file order, so the first rows could all be one class); None when the run kept no training rows."""
    path = run.data_dir / "train_x.npy"
    if not path.is_file():
        return None
    try:
        x = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise LeptonError(f"{path}: cannot read the prepared training split ({e})") from None
    if not len(x):
        return None
    pick = np.unique(np.linspace(0, len(x) - 1, min(len(x), CALIBRATION_ROWS)).astype(np.int64))
    return np.asarray(x[pick], dtype=np.float32)


def _write(
    fmt: str,
    precision: str,
    model: torch.nn.Module,
    base_meta: dict,
    pruning: dict | None,
    run: RunDir,
    log: Log,
    method: str = "auto",
    rows: np.ndarray | None = None,
) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """Write the artifact(s) of one format; returns [(format, precision, path)] and report notes.
    ``method``/``rows``: the int8 method asked for and the calibration rows (``_calibration_rows``)."""
    pruned = pruning is not None
    shape = tuple(base_meta["input_shape"])
    src = str(run.root)
    path = run.exports_dir / artifact_name(fmt, precision, pruned)
    notes: list[str] = []
    if fmt == "torchscript":
        log(f"tracing TorchScript ({precision}) → {path.name}")
        notes += write_torchscript(
            model, shape, precision, artifact_meta(base_meta, fmt, precision, pruning, src), path
        )
        return [(fmt, precision, path)], notes
    if fmt == "safetensors":
        log(f"writing safetensors ({precision}) → {path.name}")
        write_safetensors(model, precision, artifact_meta(base_meta, fmt, precision, pruning, src), path)
        return [(fmt, precision, path)], notes
    fp32_path = run.exports_dir / artifact_name("onnx", "fp32", pruned)
    log(f"exporting ONNX (fp32, dynamic batch) → {fp32_path.name}")
    proto = export_onnx(model, shape, artifact_meta(base_meta, "onnx", "fp32", pruning, src))
    write_onnx(proto, fp32_path)
    out = [("onnx", "fp32", fp32_path)]
    if precision == "int8":
        chosen = int8_method(proto, method, 0 if rows is None else len(rows), base_meta["task"])
        log(f"quantizing int8 (ONNX Runtime {chosen} quantization) → {path.name}")
        q = quantize_int8(proto, artifact_meta(base_meta, "onnx", "int8", pruning, src), chosen, rows)
        write_onnx(q, path)
        if chosen == "static":  # only with calibration rows (``int8_method``; run_export checks)
            notes.append(
                f"int8: ONNX Runtime static quantization (int8 weights, uint8 activations, one scale"
                f" per tensor, activation ranges calibrated on {len(cast(np.ndarray, rows))} training"
                " rows; input and output stay float32)"
            )
        else:
            notes.append(
                "int8: ONNX Runtime dynamic quantization (int8 weights with one scale per tensor,"
                " activations quantized per batch at run time; input and output stay float32)"
            )
        if any(n.op_type == "ConvInteger" for n in q.graph.node):
            notes.append(
                "int8 convolutions run as ConvInteger, which ONNX Runtime's CPU provider computes"
                " more slowly than float Conv at larger batches: compare the b64 columns"
                " (--int8-method static calibrates and runs them as QLinearConv)"
            )
        out.append(("onnx", "int8", path))
    elif precision in ("fp16", "bf16"):
        log(f"storing ONNX weights as {precision} → {path.name}")
        write_onnx(
            store_weights_as(proto, precision, artifact_meta(base_meta, "onnx", precision, pruning, src)),
            path,
        )
        notes.append(
            f"onnx {precision}: weights stored in {precision}, computed in float32 by ONNX Runtime"
            " (its CPU provider lacks 16-bit Gemm/Conv kernels)"
        )
        out.append(("onnx", precision, path))
    return out, notes


def run_export(
    run_dir: str | Path, spec: ExportSpec | dict | None = None, log: Log | None = None, progress: bool = False
) -> dict:
    """Run the export phase on a completed run (see module doc); returns the report."""
    spec = as_spec(spec)
    log = log or (lambda msg: None)
    if is_url(run_dir):
        return _export_elsewhere(RunDir(str(run_dir)), spec, log, progress)
    run = RunDir(run_dir)
    if run.root.is_file():
        run_of = run.root.parent.parent if run.root.parent.name == "exports" else None
        raise LeptonError(
            f"{run.root}: is a file; lepton export takes a run directory"
            + (f" (this file's run: {run_of})" if run_of else "")
        )
    if not run.root.is_dir():
        raise LeptonError(f"{run.root}: no such run directory")
    base = RunPredictor(run.model_dir)  # LeptonError when the run has no final model
    split, x, y = _eval_split(run)
    calibration = None
    if spec.precision == "int8" and spec.int8_method != "dynamic":
        calibration = _calibration_rows(run)
        if calibration is None and spec.int8_method == "static":  # before any work
            raise LeptonError(
                f"{run.data_dir / 'train_x.npy'}: int8_method static calibrates on the run's"
                " prepared training rows, and there are none; use int8_method dynamic"
                " (--int8-method dynamic)"
            )
    threads = torch.get_num_threads()
    t0 = time.perf_counter()

    model = copy.deepcopy(base.model).eval()
    pruning = None
    if spec.prune is not None:
        pruning = prune_model(
            model,
            run,
            spec.prune,
            spec.prune_scope,
            spec.finetune_epochs,
            spec.finetune_workers,
            log,
            progress,
        )

    run.exports_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, str, Path]] = []
    notes: list[str] = []
    for fmt in spec.formats:
        files, more = _write(
            fmt, spec.precision, model, base.meta, pruning, run, log, spec.int8_method, calibration
        )
        written += [f for f in files if f not in written]
        notes += more
    if pruning is not None:
        notes.append(
            "pruning is unstructured: the zeros are stored densely, so it shrinks files only"
            " together with compression; its effect shows in the pruned rows' metrics"
        )

    candidates = [
        Candidate(
            f"{MODEL_WEIGHTS} (fp32 torch eager)",
            TorchRunner(base.model),
            "torch",
            "fp32",
            run.model_dir / MODEL_WEIGHTS,
        )
    ]
    if pruning is not None:
        candidates.append(
            Candidate("pruned model (fp32 torch eager)", TorchRunner(model), "torch", "fp32", None, True)
        )
    for fmt, precision, path in written:
        p = load_artifact(path, threads=threads)  # measure what was shipped, loaded as users load it
        candidates.append(Candidate(path.name, p.runner, fmt, precision, path, pruning is not None))

    log(f"measuring {len(candidates)} candidates on the {split} split ({len(y)} rows, {threads} threads)")
    baseline_size = (run.model_dir / MODEL_WEIGHTS).stat().st_size
    rows, ref = [], None
    for c in candidates:
        row, out = measure(c, base.task, x, y, ref, baseline_size, spec.latency_runs)
        if ref is None:
            ref = out  # the fp32 torch model's outputs: every difference is measured from it
        rows.append(row)

    import onnxruntime  # only for its version: ONNX Runtime is imported when an ONNX model is made or run

    report = {
        "format": REPORT_FORMAT,
        "name": base.meta.get("name", "model"),
        "run_dir": str(run.root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": base.task,
        "split": split,
        "test_rows": int(len(y)),
        "threads": threads,
        "spec": spec.model_dump(mode="json"),
        "pruning": pruning,
        "artifacts": [str(p) for _, _, p in written],
        "rows": rows,
        "notes": notes,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(run.exports_dir / REPORT_NAME, report)
    return report


def _export_elsewhere(run: RunDir, spec: ExportSpec, log: Log, progress: bool) -> dict:
    """``run_export`` of a run on object storage: on a local copy of what it reads (storage/mirror.py),
    its ``exports/`` then uploaded into the run, file by file; the report names the run's URLs."""
    with tempfile.TemporaryDirectory(prefix="lepton-export-") as tmp:
        local = copy_run(run, Path(tmp) / "run")
        report = run_export(local.root, spec, log, progress)
        where = {str(local.root / rel): run.where(rel) for rel in _tree(local, EXPORTS_DIR)}
        report = {
            **report,
            "run_dir": run.where(),
            "artifacts": [where.get(a, a) for a in report["artifacts"]],
        }
        atomic_write_json(local.exports_dir / REPORT_NAME, report)
        log(f"uploading exports/ to {run.where(EXPORTS_DIR)}")
        for rel in _tree(local, EXPORTS_DIR):
            run.copy_in(local.root / rel, rel)
    return report


def _tree(run: RunDir, rel: str) -> list[str]:
    """The files under ``rel`` of a local run, as names relative to its root."""
    return sorted(p.relative_to(run.root).as_posix() for p in (run.root / rel).rglob("*") if p.is_file())
