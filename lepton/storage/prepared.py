"""Prepare a data set once, into a cache every worker memory-maps.

The coordinator calls ``prepare`` before any worker starts: it reads the raw file, validates it
(errors name the file, column and row), cleans it, splits it by the job seed, fits the preprocessing on
the training split and writes ``RUN_DIR/data/{train,val,test}_{x,y}.npy`` plus ``preprocess.json``.
Workers open the ``.npy`` files with ``mmap_mode='r'``: the page cache is shared, nothing is parsed twice.
They are written and read through the run's ``RunStorage``; the memory map needs a file on this
machine's disk, which ``RunStorage.local_path`` gives (the file itself locally, a cached download from
an object store).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..spec import DataSpec, JobSpec
from .preprocess import Preprocessor, column_is_missing, looks_numeric, to_float, to_strings
from .rundir import DATA_DIR, RunDir, _json_bytes
from .tables import check_used_columns, detect_format, read_table

SPLITS = ("train", "val", "test")
PREPROCESS = f"{DATA_DIR}/preprocess.json"
MANIFEST = f"{DATA_DIR}/manifest.json"  # written last: its presence says the data is complete


@dataclass
class PreparedData:
    """The in-memory result of ``prepare``; ``write`` puts it in the run directory."""

    arrays: dict[str, np.ndarray]  # "train_x", "train_y", ...
    preprocessor: Preprocessor
    report: dict  # counts of rows read/dropped, per-split sizes

    def write(self, run: RunDir, fingerprint: str) -> None:
        for key, a in self.arrays.items():
            with run.storage.open_write(f"{DATA_DIR}/{key}.npy") as f:
                np.save(f, np.ascontiguousarray(a))
        run.storage.write(PREPROCESS, _json_bytes(self.preprocessor.to_dict()))
        run.storage.write(
            MANIFEST, _json_bytes({"fingerprint": fingerprint, **self.report})
        )  # last: complete


def share_prepared(source: RunDir, run: RunDir) -> None:
    """``source``'s prepared files into ``run``: hard links where both are one local file system
    (prepared files are only ever replaced by a rename, never written in place, so sharing them is
    safe), else a copy; the manifest last, as ``PreparedData.write`` does, so an interrupted copy
    reads as missing."""
    names = sorted(n for n in source.storage.list(DATA_DIR) if not n.endswith("/") and n != "manifest.json")
    for name in names + ["manifest.json"]:
        rel = f"{DATA_DIR}/{name}"
        run.copy_in(source.storage.local_path(rel), rel, link=True)


def fingerprint(job: JobSpec) -> str:
    """Identifies the prepared cache: the data section, the seed, and the source file's size/mtime."""
    d = job.data.model_dump(mode="json")
    try:
        st = os.stat(job.data.path)
        d["_stat"] = [st.st_size, int(st.st_mtime)]
    except OSError:
        pass  # a remote URL: the spec alone identifies it
    d["_seed"], d["_task"] = job.seed, job.task
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def cache_state(run: RunDir, job: JobSpec) -> str:
    """``current``: the run's prepared data matches the source; ``changed``: it is complete (the
    manifest is written last) but the source file changed, moved or is gone since; ``missing``: there
    is none (or only part of one)."""
    try:
        manifest = json.loads(run.storage.read(MANIFEST).decode())
    except (OSError, json.JSONDecodeError):
        return "missing"
    return "current" if manifest.get("fingerprint") == fingerprint(job) else "changed"


def prepare(job: JobSpec) -> PreparedData:
    spec: DataSpec = job.data
    src = spec.path
    csv = detect_format(src, spec.format) == "csv"
    table = read_table(src, spec.format, categorical=spec.categorical)
    names = table.column_names
    if spec.target not in names:
        raise DataError(f"{src}: target column '{spec.target}' not found (columns: {', '.join(names)})")
    if spec.features == "all":
        # a line that ends with a comma gives an unnamed, empty last column: not a feature
        features = [
            c
            for c in names
            if c != spec.target and (c.strip() or table.column(c).null_count < table.num_rows)
        ]
    else:
        unknown = [c for c in spec.features if c not in names]
        if unknown:
            raise DataError(
                f"{src}: feature column(s) {', '.join(map(repr, unknown))} not found"
                f" (columns: {', '.join(names)})"
            )
        features = list(spec.features)
    if spec.target in features:
        raise DataError(f"{src}: data.features lists the target column '{spec.target}'")
    if not features:
        raise DataError(f"{src}: no feature columns (the file has only the target '{spec.target}')")
    check_used_columns(table, features + [spec.target], src)
    bad_cat = [c for c in spec.categorical if c not in features]
    if bad_cat:
        raise DataError(f"data.categorical: {', '.join(map(repr, bad_cat))} not among the feature columns")

    # --- typing ----------------------------------------------------------------------------------
    kinds = {
        c: "categorical" if c in spec.categorical or not looks_numeric(table.column(c)) else "numeric"
        for c in features
    }
    raw = {
        c: to_float(table.column(c), c, src, csv) if kinds[c] == "numeric" else to_strings(table.column(c))
        for c in features
    }
    tcol = table.column(spec.target)
    if job.task == "regression":
        y_raw = to_float(tcol, spec.target, src, csv)
        y_missing = np.isnan(y_raw)
    else:
        y_raw = np.array(tcol.to_pylist(), dtype=object)
        y_missing = np.array([v is None for v in y_raw], dtype=bool)
    n_read = table.num_rows

    # --- cleaning --------------------------------------------------------------------------------
    keep = ~y_missing
    n_dupes = 0
    if spec.preprocess.dedupe:
        first = _first_occurrences(raw, kinds, y_raw)
        n_dupes = int(n_read - first.sum())
        keep &= first
    feature_missing = np.zeros(n_read, dtype=bool)
    for c in features:
        feature_missing |= column_is_missing(raw[c], kinds[c])
    if spec.preprocess.missing == "error" and (feature_missing & keep).any():
        row = int(np.flatnonzero(feature_missing & keep)[0])
        col = next(c for c in features if column_is_missing(raw[c], kinds[c])[row])
        raise DataError(
            f"{src}: column '{col}', row {row + 1}: missing value (data.preprocess.missing is 'error')"
        )
    n_missing = int((feature_missing & keep).sum())
    if spec.preprocess.missing == "drop":
        keep &= ~feature_missing
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise DataError(
            f"{src}: no rows left after cleaning ({n_read} read, {n_dupes} duplicates,"
            f" {int(y_missing.sum())} without a target, {n_missing} with missing features)"
        )

    # --- labels ----------------------------------------------------------------------------------
    classes = None
    if job.task == "classification":
        labels = y_raw[rows]
        if spec.classes is not None:
            allowed = {str(c) for c in spec.classes}
            for r in rows:
                if str(y_raw[r]) not in allowed:
                    where = f"row {r + 1} (line {r + 2})" if csv else f"row {r + 1}"
                    raise DataError(
                        f"{src}: column '{spec.target}', {where}: label {y_raw[r]!r} is not one of"
                        f" the model's classes {list(spec.classes)} (data.classes)"
                    )
            classes = list(spec.classes)
        else:
            classes = sorted(set(labels.tolist()), key=lambda v: (isinstance(v, str), v))
        if len(classes) < 2:
            raise DataError(
                f"{src}: column '{spec.target}' has a single class {classes}; "
                "classification needs at least two (or set task: regression)"
            )

    # --- split (seeded by the job seed) and fit on train only -----------------------------------
    perm = rows[np.random.default_rng(job.seed).permutation(rows.size)]
    n = rows.size
    n_train = max(1, int(round(spec.split.train * n)))
    n_val = min(int(round(spec.split.val * n)), n - n_train)
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    pre = Preprocessor.fit(
        {c: raw[c][parts["train"]] for c in features},
        kinds,
        target=spec.target,
        task=job.task,
        classes=classes,
        missing=spec.preprocess.missing,
        normalize=spec.preprocess.normalize,
        shape=spec.shape,
    )
    if spec.shape and int(np.prod(spec.shape)) != pre.num_features:
        raise DataError(
            f"data.shape {spec.shape} holds {int(np.prod(spec.shape))} values but the data has"
            f" {pre.num_features} features"
        )
    arrays = {}
    for split, idx in parts.items():
        arrays[f"{split}_x"] = pre.transform({c: raw[c][idx] for c in features})
        arrays[f"{split}_y"] = pre.encode_target(y_raw[idx])
    report = {
        "rows_read": n_read,
        "duplicates_dropped": n_dupes,
        "missing_target_dropped": int(y_missing.sum()),
        "missing_features": n_missing,
        "rows": int(n),
        **{f"{s}_rows": int(parts[s].size) for s in SPLITS},
        "features": pre.num_features,
        "classes": classes,
    }
    return PreparedData(arrays, pre, report)


def _first_occurrences(raw: dict[str, np.ndarray], kinds: dict[str, str], y: np.ndarray) -> np.ndarray:
    """Boolean mask of rows that are not an exact repeat of an earlier row (features and target)."""
    n = len(y)
    codes = []
    for c, v in raw.items():
        if kinds[c] == "numeric":
            codes.append(v)
        else:
            _, inv = np.unique(
                np.array(["\0" if s is None else s for s in v], dtype=object).astype(str), return_inverse=True
            )
            codes.append(inv.astype(np.float64))
    if y.dtype == object:
        _, inv = np.unique(np.array([str(v) for v in y]), return_inverse=True)
        codes.append(inv.astype(np.float64))
    else:
        codes.append(y.astype(np.float64))
    mat = np.ascontiguousarray(np.stack(codes, axis=1))
    rows = mat.view(np.dtype((np.void, mat.dtype.itemsize * mat.shape[1]))).ravel()
    _, first = np.unique(rows, return_index=True)
    mask = np.zeros(n, dtype=bool)
    mask[first] = True
    return mask


class DataCache:
    """A worker's read-only view of the prepared splits (memory-mapped)."""

    def __init__(self, run: RunDir):
        self.storage = run.storage
        self.preprocessor = Preprocessor.from_dict(json.loads(self.storage.read(PREPROCESS).decode()))
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        for part in ("x", "y"):
            key = f"{split}_{part}"
            if key not in self._arrays:
                self._arrays[key] = np.load(self.storage.local_path(f"{DATA_DIR}/{key}.npy"), mmap_mode="r")
        return self._arrays[f"{split}_x"], self._arrays[f"{split}_y"]
