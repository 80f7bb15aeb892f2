"""The model description every exported artifact carries, so that one file can be shipped and served.

An artifact embeds the run's ``model/lepton.json`` (task, classes, input shape, model spec, the fitted
preprocessing) minus the training metrics, plus an ``artifact`` section (format, precision, pruning,
source run). It is stored as zlib-compressed JSON in base64 under the key ``lepton.json.z`` of the
format's own metadata slot (ONNX ``metadata_props``, TorchScript extra files, safetensors header):
the preprocessing of a wide table is several kB of repetitive JSON, more than a small model's weights,
and compressing it keeps the size comparison of the report about the parameters.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import zlib

from ..errors import LeptonError

META_KEY = "lepton.json.z"
ARTIFACT_FORMAT = "lepton-artifact/1"
# what a loader needs from the description; anything missing means a file from somewhere else
REQUIRED = ("task", "classes", "input_shape", "preprocess", "artifact")


def encode_meta(meta: dict) -> str:
    raw = json.dumps(meta, separators=(",", ":"), default=str).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode_meta(text: str | bytes | None, source: str) -> dict:
    """The description stored by ``encode_meta``; a missing or damaged one is a ``LeptonError``."""
    if not text:
        raise LeptonError(
            f"{source}: no Lepton metadata ('{META_KEY}') in this file; export the model "
            "with `lepton export` so that its preprocessing travels with it"
        )
    try:
        meta = json.loads(zlib.decompress(base64.b64decode(text, validate=True)))
    except (binascii.Error, zlib.error, ValueError) as e:
        raise LeptonError(f"{source}: corrupt Lepton metadata ({e})") from None
    missing = [k for k in REQUIRED if k not in meta] if isinstance(meta, dict) else list(REQUIRED)
    if missing:
        raise LeptonError(f"{source}: Lepton metadata lacks {', '.join(missing)}")
    return meta


def artifact_meta(model_meta: dict, fmt: str, precision: str, pruning: dict | None, source_run: str) -> dict:
    """The description of one artifact, from the run's model description."""
    meta = {k: v for k, v in model_meta.items() if k not in ("metrics", "format")}
    meta["format"] = ARTIFACT_FORMAT
    meta["artifact"] = {
        "format": fmt,
        "precision": precision,
        "pruning": pruning,
        "source_run": source_run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return meta
