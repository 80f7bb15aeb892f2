"""Loading a trained model for prediction: ``lepton.load(RUN_DIR)`` and ``lepton predict``.

Raw rows go in; the run's saved preprocessing (fitted on its training split) is applied; predictions
and, for classification, class probabilities come out.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .errors import LeptonError
from .models import build_model, num_outputs
from .spec import parse_job
from .storage.checkpoint import MODEL_META, read_model
from .storage.preprocess import Preprocessor
from .storage.rundir import RunDir
from .storage.tables import detect_format, read_table


class Predictor:
    def __init__(self, model_dir: Path):
        if not (model_dir / MODEL_META).is_file():
            raise LeptonError(f"{model_dir}: no trained model here (expected {MODEL_META}; did the run complete?)")
        try:
            weights, self.meta = read_model(model_dir)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise LeptonError(f"{model_dir}: cannot read the model: {e}") from None
        self.preprocessor = Preprocessor.from_dict(self.meta["preprocess"])
        self.task = self.meta["task"]
        self.classes = self.meta["classes"]
        factory = None
        pickled = model_dir / "model_factory.pkl"
        if pickled.exists():
            import cloudpickle
            factory = cloudpickle.loads(pickled.read_bytes())
        job = parse_job({"name": self.meta["name"], "seed": self.meta["seed"], "task": self.task,
                         "data": {"path": "-", "target": self.preprocessor.target,
                                  "shape": self.preprocessor.shape},
                         "model": self.meta["model"]}, source=str(model_dir / MODEL_META))
        self.model = build_model(job, tuple(self.meta["input_shape"]), num_outputs(self.task, self.classes), factory)
        self.model.load_state_dict(weights)
        self.model.eval()

    @torch.no_grad()
    def predict_array(self, x: np.ndarray) -> dict:
        """Preprocessed features → {"prediction": labels or values, "probabilities": (n, classes)}."""
        out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if self.task == "regression":
            return {"prediction": out.reshape(-1).numpy()}
        prob = torch.softmax(out, dim=1).numpy()
        return {"prediction": [self.classes[i] for i in prob.argmax(1)], "probabilities": prob}

    def predict_table(self, table: pa.Table, source: str = "input", csv: bool = False) -> dict:
        return self.predict_array(self.preprocessor.read_features(table, source, csv))

    def predict_file(self, path: str) -> dict:
        return self.predict_table(read_table(path), path, detect_format(path) == "csv")

    def predict_rows(self, rows: list[dict]) -> dict:
        return self.predict_table(pa.Table.from_pylist(rows), "rows")

    def write_csv(self, result: dict, path: str) -> None:
        cols = {"prediction": result["prediction"]}
        if "probabilities" in result:
            for j, c in enumerate(self.classes):
                cols[f"prob_{c}"] = result["probabilities"][:, j]
        import pyarrow.csv as pacsv
        from .storage.rundir import atomic_write_bytes
        buf = pa.BufferOutputStream()
        pacsv.write_csv(pa.table(cols), buf)
        atomic_write_bytes(Path(path), buf.getvalue().to_pybytes())


def load(path: str | Path) -> Predictor:
    """A predictor from a run directory (its ``model/``), a model directory, or an exported artifact
    file (ONNX through onnxruntime, TorchScript, safetensors) with the same interface."""
    p = Path(path)
    if not p.exists():
        raise LeptonError(f"{p}: no such run or model directory")
    if p.is_file():                                  # an exported artifact (lepton export)
        from .export.artifacts import load_artifact
        return load_artifact(p)
    model_dir = RunDir(p).model_dir if (p / "model").is_dir() or (p / "state.json").exists() else p
    return Predictor(model_dir)
