"""Prediction with a trained model: the ``Predictor`` base and ``RunPredictor`` (a run's torch model).

``lepton.load(PATH)`` (``api.load``) is the one entry point: it picks ``RunPredictor`` for a run or
model directory and ``export.artifacts.ArtifactPredictor`` for an exported file.

Raw rows go in; the run's saved preprocessing (fitted on its training split) is applied; predictions
and, for classification, class probabilities come out.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from safetensors import SafetensorError

from .errors import DataError, LeptonError, first_line
from .model.builders import build_model, num_outputs
from .spec import parse_job
from .storage.checkpoint import MODEL_META, MODEL_WEIGHTS, read_model
from .storage.preprocess import CellError, Preprocessor
from .storage.rundir import RunDir, atomic_write_bytes
from .storage.tables import SUFFIXES, detect_format, read_table

# prediction has no data.format option: the input's file name has to tell the format
INPUT_NAMES = "prediction takes the format from the extension: name the input " + ", ".join(
    f"*{s}" for s, _ in SUFFIXES
)


def load_weights(model: torch.nn.Module, state: dict, source: object, described: str) -> None:
    """``model.load_state_dict(state)``; weights of other shapes are a ``LeptonError`` naming ``source``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        # torch's first line is only "Error(s) in loading state_dict for Sequential:"; the next one
        # names the tensor and both shapes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise LeptonError(
            f"{source}: the weights do not fit {described} ({lines[min(1, len(lines) - 1)]})"
        ) from None


class OutputError(LeptonError):
    """The model's output for row ``row`` (0-based) is not finite: its input is beyond what the network
    can compute in float32. ``predict_table`` restates it naming the likely cell."""

    def __init__(self, message: str, row: int):
        super().__init__(message)
        self.row = row


class Predictor(ABC):
    """Raw rows, tables, files or preprocessed arrays in; predictions (and class probabilities) out.

    One hierarchy, one entry point (``lepton.load``): ``RunPredictor`` runs a run's torch model,
    ``export.artifacts.ArtifactPredictor`` an exported file. A subclass reads its model description
    ``meta`` (task, classes, input shape, the fitted preprocessing), passes it to ``__init__`` and
    implements ``forward`` and ``describe``; everything else is shared, so the checks and the answers
    are the same whatever runs the model."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.preprocessor = Preprocessor.from_dict(meta["preprocess"])
        self.task = meta["task"]
        self.classes = meta["classes"]
        self.input_shape = tuple(meta["input_shape"])

    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(rows, *input_shape)`` → the model's float32 outputs ``(rows, outputs)``."""

    @abstractmethod
    def describe(self) -> dict:
        """A short JSON-able description (source, format, precision, task) for ``/healthz`` and logs."""

    def check_features(self, x) -> np.ndarray:
        """``x`` as the float32 ``(rows, *input_shape)`` array the model takes, or a ``LeptonError``
        saying what is wrong with it (one check for the run's model and for exported artifacts)."""
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as e:  # ragged nested lists
            raise LeptonError(f"{self.path}: features must be a numeric array ({first_line(e)})") from None
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(
            x.dtype, np.complexfloating
        ):
            raise LeptonError(f"{self.path}: features must be numeric, got an array of dtype {x.dtype}")
        if x.ndim < 1 or tuple(x.shape[1:]) != self.input_shape:
            raise LeptonError(
                f"{self.path}: features must have shape (rows, {', '.join(map(str, self.input_shape))}),"
                f" got {tuple(x.shape)}"
            )
        with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, refused just below
            x = np.ascontiguousarray(x, dtype=np.float32)
        bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
        if bad.any():
            raise LeptonError(
                f"{self.path}: features must be finite numbers; row {int(np.flatnonzero(bad)[0])}"
                " has NaN or inf (beyond float32 range, or missing)"
            )
        return x

    def predict_array(self, x: np.ndarray) -> dict:
        """Preprocessed features → {"prediction": labels or values, "probabilities": (n, classes)}."""
        x = self.check_features(x)
        out = (
            self.forward(x)
            if len(x)
            else np.zeros((0, num_outputs(self.task, self.classes)), dtype=np.float32)
        )
        if self.task == "regression":
            result: dict[str, Any] = {"prediction": out.reshape(-1)}
            finite = np.isfinite(result["prediction"])
        else:
            # softmax in torch for every predictor, so equal logits give equal probabilities
            prob = torch.softmax(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), dim=1).numpy()
            result = {"prediction": [self.classes[i] for i in prob.argmax(1)], "probabilities": prob}
            finite = np.isfinite(prob).all(1)
        if not finite.all():
            # finite inputs so large that the network overflows float32: a NaN answer must not pass as one
            row = int(np.flatnonzero(~finite)[0])
            raise OutputError(
                f"{self.path}: the model's output for row {row} is not finite (NaN or inf): its"
                " features are too large for it",
                row,
            )
        return result

    def predict_table(self, table: pa.Table, source: str = "input", csv: bool = False) -> dict:
        x = self.preprocessor.read_features(table, source, csv)
        try:
            return self.predict_array(x)
        except OutputError as e:
            # name the row's value furthest from the training data (in the run's scaling): the likely cause
            j = int(np.abs(x[e.row]).argmax())  # flat index into the row's features
            column = self.preprocessor.column_at(j)
            value = table.column(column)[e.row].as_py()
            raise CellError(
                source,
                column,
                e.row,
                f"{value!r} is too far outside the training data: the model's"
                " output for this row is not finite (NaN or inf)",
                csv,
            ) from None

    def predict_file(self, path: str) -> dict:
        kind = detect_format(path, hint=INPUT_NAMES)
        categorical = [c for c in self.preprocessor.columns if c.kind == "categorical"]
        table = read_table(
            path,
            kind,
            [c.name for c in categorical],
            text=[c.name for c in categorical if c.spellings_collide],
        )
        return self.predict_table(table, path, kind == "csv")

    def predict_rows(self, rows: list[dict]) -> dict:
        """Raw rows ``[{column: value}, ...]``; a bad value is an error naming ``rows[i].column``."""
        try:
            return self.predict_table(rows_as_table(rows), "rows")
        except CellError as e:
            raise DataError(e.as_list_item()) from None

    def write_csv(self, result: dict, path: str) -> None:
        check_output(path)
        cols = {"prediction": result["prediction"]}
        if "probabilities" in result:
            for j, c in enumerate(self.classes):
                cols[f"prob_{c}"] = result["probabilities"][:, j]
        buf = pa.BufferOutputStream()
        pacsv.write_csv(pa.table(cols), buf)
        try:
            atomic_write_bytes(Path(path), buf.getvalue().to_pybytes())
        except OSError as e:  # a read-only folder, a full disk
            raise LeptonError(f"{path}: cannot write the predictions: {e.strerror or e}") from None


class RunPredictor(Predictor):
    """A ``Predictor`` running a trained run's torch model (``RUN_DIR/model/``: weights, description
    and, for a Python factory, its pickle)."""

    def __init__(self, model_dir: Path):
        if not (model_dir / MODEL_META).is_file():
            raise LeptonError(
                f"{model_dir}: no trained model here (expected {MODEL_META}; did the run complete?)"
            )
        try:
            weights, meta = read_model(model_dir)
        except json.JSONDecodeError as e:
            raise LeptonError(f"{model_dir / MODEL_META}: cannot read the model description: {e}") from None
        except SafetensorError as e:  # an empty or truncated weights file
            raise LeptonError(
                f"{model_dir / MODEL_WEIGHTS}: cannot read the weights ({first_line(e)})"
            ) from None
        except (OSError, ValueError) as e:
            raise LeptonError(f"{model_dir}: cannot read the model: {e}") from None
        try:
            super().__init__(model_dir, meta)
            raw_job = {
                "name": meta["name"],
                "seed": meta["seed"],
                "task": self.task,
                "data": {"path": "-", "target": self.preprocessor.target, "shape": self.preprocessor.shape},
                "model": meta["model"],
            }
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited or foreign lepton.json
            problem = f"lacks {e}" if isinstance(e, KeyError) else f"is malformed ({first_line(e)})"
            raise LeptonError(f"{model_dir / MODEL_META}: the model description {problem}") from None
        factory = None
        pickled = model_dir / "model_factory.pkl"
        if pickled.exists():
            try:
                factory = cloudpickle.loads(pickled.read_bytes())
            except Exception as e:  # unpickling raises whatever the pickled code raises
                raise LeptonError(f"{pickled}: cannot load the model's factory ({first_line(e)})") from None
        job = parse_job(raw_job, source=str(model_dir / MODEL_META))
        self.model = build_model(job, self.input_shape, num_outputs(self.task, self.classes), factory)
        load_weights(self.model, weights, model_dir / MODEL_WEIGHTS, f"the model described in {MODEL_META}")
        self.model.eval()

    @torch.no_grad()
    def forward(self, x: np.ndarray) -> np.ndarray:
        if not x.flags.writeable:  # e.g. a memory-mapped cache: torch wants writable memory
            x = x.copy()
        return self.model(torch.from_numpy(x)).numpy()

    def describe(self) -> dict:
        return {"source": "run model", "format": "torch", "precision": "fp32", "task": self.task}


def run_model_dir(path: str | Path) -> Path:
    """The model directory of ``path``: a run directory's ``model/``, else ``path`` itself."""
    p = Path(path)
    return RunDir(p).model_dir if (p / "model").is_dir() or (p / "state.json").exists() else p


def rows_as_table(rows) -> pa.Table:
    """``[{column: value}, ...]`` as a table. A column whose values pyarrow cannot type as one (numbers
    and strings mixed, say) is read as text, so that the preprocessing names the cell that is not a
    number instead of pyarrow refusing the whole list."""
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"rows: expected a list of dicts {{column: value}}, got {type(rows).__name__}")
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"rows[{i}]: expected a dict {{column: value}}, got {type(row).__name__}")
        odd = next((k for k in row if not isinstance(k, str)), None)
        if odd is not None:
            raise DataError(f"rows[{i}]: column names must be strings, got {odd!r}")
        names.update(dict.fromkeys(row))
    cols = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            cols[name] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            cols[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(cols)


def check_output(
    path: str | Path, input_path: str | None = None, label: str = "", model_path: str | Path | None = None
) -> Path:
    """``path`` as the place of a new predictions file, checked before any work: not a directory, not
    inside a file, not the input (the predictions would replace the data they came from), and not the
    model it predicts with nor anything in its run's model/, exports/, checkpoints/ or data/.
    ``label`` goes before the path in messages (``--output `` on the command line)."""
    p = Path(path)
    if p.is_dir():
        raise LeptonError(
            f"{label}{path}: is a directory; give a file name for the predictions,"
            f" e.g. {p / 'predictions.csv'}"
        )
    parent = next((a for a in p.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise LeptonError(f"{label}{path}: {parent} is a file, not a directory")
    if input_path is not None and "://" not in str(input_path):
        inp = Path(input_path)
        same = os.path.samefile(p, inp) if p.exists() and inp.exists() else p.resolve() == inp.resolve()
        if same:
            raise LeptonError(
                f"{label}{path}: is the input file; the predictions would overwrite the data,"
                " write them to another file"
            )
    if model_path is not None and "://" not in str(model_path):  # a run on object storage: nothing here
        target = p.resolve()
        for kept in _model_files(Path(model_path)):
            if target == kept or kept in target.parents:
                raise LeptonError(
                    f"{label}{path}: is among the model's files ({kept}), which predictions must not"
                    " overwrite or join; write them somewhere else"
                )
    return p


def _model_files(model: Path) -> list[Path]:
    """What predicting with ``model`` (a run, a model directory or an artifact) must leave alone."""
    model = model.resolve()
    kept = [model] if model.is_file() or (model / "lepton.json").exists() else []  # an artifact, a model dir
    for root in (model, model.parent, model.parent.parent):
        if (root / "model" / "lepton.json").exists():  # a run directory
            kept += [root / d for d in ("model", "exports", "checkpoints", "data")]
    return kept
