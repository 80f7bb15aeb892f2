"""Column typing, cleaning and scaling, fitted on the training split and saved with the model.

``Preprocessor`` is the single place that turns raw columns into the float32 feature matrix, both
while preparing the training cache and when ``lepton predict`` / ``lepton.load`` receive raw rows, so
a model always sees its inputs transformed exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from itertools import accumulate
from typing import Any, cast

import numpy as np
import pyarrow as pa

from ..errors import DataError
from .tables import check_used_columns

# A string column where at least this fraction of values parse as numbers is a numeric column with
# bad values (an error that names the row), not a categorical column.
NUMERIC_MAJORITY = 0.9


def _row_ref(row: int, csv: bool) -> str:
    """1-based data row; for CSV also the file line (the header is line 1)."""
    return f"row {row + 1} (line {row + 2})" if csv else f"row {row + 1}"


class CellError(DataError):
    """A bad value in one cell. The message names the file, column and 1-based row; ``column``,
    ``row`` (0-based) and ``problem`` let a caller whose rows are a list (the HTTP server,
    ``predict_rows``) restate it as ``rows[i].column: problem``, the way its other errors read."""

    def __init__(self, source: str, column: str, row: int, problem: str, csv: bool = False):
        super().__init__(f"{source}: column '{column}', {_row_ref(row, csv)}: {problem}")
        self.column, self.row, self.problem = column, row, problem

    def as_list_item(self) -> str:
        return f"rows[{self.row}].{self.column}: {self.problem}"


def _is_numeric_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)


def _shown(v: Any) -> str:
    """``repr(v)``, cut short: a message line must stay one line, whatever the cell holds."""
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:30]}... ({len(str(v))} characters)"


def _parse_float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def looks_numeric(col: pa.ChunkedArray) -> bool:
    if _is_numeric_type(col.type):
        return True
    if pa.types.is_temporal(col.type):  # dates and times: categories
        return False
    values = [v for v in col.to_pylist() if v is not None]
    if not values:
        return True
    ok = sum(_parse_float(v) is not None for v in values)
    return ok >= NUMERIC_MAJORITY * len(values)


def to_float(col: pa.ChunkedArray, name: str, source: str, csv: bool) -> np.ndarray:
    """float64 values with NaN for missing; a value that is not a number, or is infinite, is an error
    naming the row. NaN (a CSV ``nan``) stays a missing value, which ``preprocess.missing`` handles;
    an infinity has no such meaning: it would make the fitted mean/scale infinite in training (every
    step's loss NaN, the run stopped as diverged) and the outputs NaN in prediction."""
    if _is_numeric_type(col.type):
        out = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        inf = np.isinf(out)
        if inf.any():
            i = int(np.flatnonzero(inf)[0])
            raise CellError(source, name, i, f"{out[i]} is not a finite number", csv)
        return out
    out = np.empty(len(col), dtype=np.float64)
    for i, v in enumerate(col.to_pylist()):
        if v is None or (isinstance(v, str) and not v.strip()):
            out[i] = np.nan
            continue
        f = _parse_float(v)
        if f is None:
            raise CellError(source, name, i, f"{_shown(v)} is not a number", csv)
        if np.isinf(f):  # 'inf', or digits beyond float64
            raise CellError(source, name, i, f"{_shown(v)} is not a finite number", csv)
        out[i] = f
    return out


def to_strings(col: pa.ChunkedArray) -> np.ndarray:
    """Object array of str with None for missing (ints in a categorical column become their text)."""
    if pa.types.is_floating(col.type) and col.type.bit_width < 64:
        # a float32 0.1 is 0.10000000149011612 as a Python float, which matches no category '0.1':
        # numpy writes each value at its own precision
        nums, missing = col.to_numpy(zero_copy_only=False), col.is_null().to_numpy(zero_copy_only=False)
        return np.array([None if m else str(v) for v, m in zip(nums, missing)], dtype=object)
    try:
        values = col.to_pylist()
    except ValueError:
        # nanosecond times have no Python value without pandas: pyarrow's own text of them
        values = col.cast(pa.string()).to_pylist()
    return np.array([None if v is None else str(v) for v in values], dtype=object)


@dataclass
class ColumnStats:
    name: str
    kind: str  # "numeric" | "categorical"
    fill: Any = None  # imputation value (None: rows with missing values are refused)
    categories: list[str] = field(default_factory=list)
    center: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        self._index: dict | None = None  # built on first use (the categories are set after fitting)
        self._keys: dict = {}

    @property
    def width(self) -> int:
        return len(self.categories) if self.kind == "categorical" else 1

    def category_index(self, value: str) -> int | None:
        """The position of ``value`` among the categories: the same text, or else the same value in
        another spelling (``category_key``), or None for a category unseen in training. Why: a CSV
        column's categories are pyarrow's text of what it typed (``True`` for ``true``, ``1234`` for
        ``01234``), or the text as written where it typed the column as text, and a prediction file's
        column is typed by its own values. A file of only ``true``/``false`` (or only digits) reads as
        bool (int) where the training file held some other word, and Parquet or JSON rows carry typed
        values: matching the text alone encoded such rows as unseen, all zeros, silently."""
        self._build()
        i = cast(dict, self._index).get(value)  # _build() set it
        if i is None:
            k = category_key(value)
            i = self._keys.get(k) if k is not None else None
        return i

    @property
    def spellings_collide(self) -> bool:
        """Whether two categories are spellings of one value (``01234`` and ``1234``, from a column
        pyarrow typed as text in training). Their values are only told apart as written: a prediction
        CSV whose column holds only digits types it int, and the row ``01234`` would become ``1234``."""
        self._build()
        return None in self._keys.values()

    def _build(self) -> None:
        if self._index is None:  # both built before either is published: serve's threads share it
            keys: dict = {}
            for i, c in enumerate(self.categories):
                for k in {category_key(c), _narrow_float_key(c)} - {None}:
                    keys[k] = None if k in keys else i  # two spellings of one value: neither matches
            self._keys = keys
            self._index = {c: i for i, c in enumerate(self.categories)}


_TRUE, _FALSE = {"true", "True", "TRUE"}, {"false", "False", "FALSE"}  # pyarrow's CSV spellings


@lru_cache(maxsize=1 << 16)  # a column's unseen values repeat: parse each once
def category_key(text: str):
    """The value a category's text stands for, in a form that compares across spellings: a boolean, a
    number (``01234`` = ``1234`` = ``1234.0``, exactly), or a date/time (``2024-01-01T10:00:00`` = pyarrow's
    ``2024-01-01 10:00:00``); None for other text, which matches only itself."""
    t = text.strip()
    if t in _TRUE or t in _FALSE:
        return ("bool", t in _TRUE)
    try:  # exact: a long identifier (12345678901234567) must not meet its float64 neighbours
        x = Decimal(t)
        return ("number", x) if x.is_finite() else None
    except InvalidOperation:
        pass
    for kind, parse in (("time", datetime.fromisoformat), ("clock", dtime.fromisoformat)):
        try:
            return (kind, parse(t))
        except ValueError:
            pass
    return None


def _narrow_float_key(text: str):
    """The key of the float32/float16 value whose float64 widening ``text`` is: models trained before
    ``to_strings`` wrote such values at their own precision hold '0.10000000149011612' for a Parquet
    float32 0.1, which their own data now reads as '0.1'. None for other text."""
    try:
        x = float(text)
    except ValueError:
        return None
    for narrow in (np.float16, np.float32):  # float16 first: its values are float32 values too
        with np.errstate(over="ignore"):
            v = narrow(x)
        if np.isfinite(v) and repr(float(v)) == text and str(v) != text:
            return category_key(str(v))
    return None


@dataclass
class Preprocessor:
    """Fitted statistics. ``to_dict``/``from_dict`` round-trip through the model's lepton.json."""

    columns: list[ColumnStats]
    target: str
    task: str
    classes: list[Any] | None  # class labels in output order (classification)
    shape: list[int] | None = None

    # --- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        raw: dict[str, np.ndarray],
        kinds: dict[str, str],
        *,
        target: str,
        task: str,
        classes: list[Any] | None,
        missing: str,
        normalize: str,
        shape: list[int] | None,
    ) -> "Preprocessor":
        """``raw`` holds the training split's columns (float64 with NaN / object with None)."""
        stats = []
        for name, values in raw.items():
            st = ColumnStats(name, kinds[name])
            if st.kind == "numeric":
                present = values[~np.isnan(values)]
                if missing in ("mean", "median", "most_frequent") and present.size:
                    if missing == "mean":
                        st.fill = float(present.mean())
                    elif missing == "median":
                        st.fill = float(np.median(present))
                    else:
                        vals, counts = np.unique(present, return_counts=True)
                        st.fill = float(vals[counts.argmax()])
                filled = np.where(np.isnan(values), st.fill if st.fill is not None else 0.0, values)
                if normalize == "standard" and filled.size:
                    st.center, sd = float(filled.mean()), float(filled.std())
                    st.scale = sd if sd > 0 else 1.0
                elif normalize == "minmax" and filled.size:
                    lo, hi = float(filled.min()), float(filled.max())
                    st.center, st.scale = lo, (hi - lo) if hi > lo else 1.0
            else:
                present = [v for v in values if v is not None]
                st.categories = sorted(set(present))
                if missing != "drop" and missing != "error" and present:
                    vals, counts = np.unique(np.array(present, dtype=object).astype(str), return_counts=True)
                    st.fill = str(vals[counts.argmax()])
            stats.append(st)
        return cls(stats, target, task, classes, shape)

    # --- applying ------------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def num_features(self) -> int:
        return sum(c.width for c in self.columns)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) if self.shape else (self.num_features,)

    def transform(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """Feature matrix (rows, *input_shape) float32. Missing values must already be filled or
        the rows dropped; remaining NaN/None get the fitted fill value."""
        n = len(next(iter(raw.values()))) if raw else 0
        out = np.empty((n, self.num_features), dtype=np.float32)
        j = 0
        for st in self.columns:
            v = raw[st.name]
            if st.kind == "numeric":
                if st.fill is not None:
                    v = np.where(np.isnan(v), st.fill, v)
                # a scaled value beyond float32 becomes inf here, without numpy's overflow warning:
                # read_features reports it as an error naming the cell
                with np.errstate(over="ignore", invalid="ignore"):
                    out[:, j] = (v - st.center) / st.scale
                j += 1
            else:
                onehot = np.zeros((n, st.width), dtype=np.float32)
                find = st.category_index
                for r, s in enumerate(v):
                    s = st.fill if s is None else s
                    k = None if s is None else find(s)
                    if k is not None:  # a category unseen in training encodes as all zeros
                        onehot[r, k] = 1.0
                out[:, j : j + st.width] = onehot
                j += st.width
        return out.reshape((n,) + self.input_shape)

    def encode_target(self, y: np.ndarray) -> np.ndarray:
        if self.task == "regression":
            return y.astype(np.float32)
        classes = cast(list, self.classes)  # a classification preprocessor always has its classes
        index = {str(c): i for i, c in enumerate(classes)}
        return np.array([index[str(v)] for v in y], dtype=np.int64)

    def read_features(self, table: pa.Table, source: str, csv: bool) -> np.ndarray:
        """Raw rows (e.g. a CSV for ``lepton predict``) to the model's input, with clear errors."""
        missing_cols = [c for c in self.feature_names if c not in table.column_names]
        if missing_cols:
            raise DataError(
                f"{source}: missing feature column(s) {', '.join(repr(c) for c in missing_cols)}"
                f" (the model needs: {', '.join(self.feature_names)})"
            )
        check_used_columns(table, self.feature_names, source)
        raw = {}
        for st in self.columns:
            col = table.column(st.name)
            v = to_float(col, st.name, source, csv) if st.kind == "numeric" else to_strings(col)
            holes = np.isnan(v) if st.kind == "numeric" else np.array([s is None for s in v], dtype=bool)
            if holes.any() and st.fill is None:
                row = int(np.flatnonzero(holes)[0])
                raise CellError(
                    source,
                    st.name,
                    row,
                    "missing value (the run's preprocess.missing is 'drop', so no fill value was fitted)",
                    csv,
                )
            raw[st.name] = v
        x = self.transform(raw)
        # A finite value can still be out of the model's reach: scaled by the fitted statistics it
        # may overflow float32 (1e300 anywhere; 1e37 in a column whose training values spread over
        # 0.01), and the model would answer NaN for the row.
        flat = x.reshape(len(x), self.num_features)
        for st, j in zip(self.columns, self.offsets):
            if st.kind == "numeric":
                bad = ~np.isfinite(flat[:, j])
                if bad.any():
                    row = int(np.flatnonzero(bad)[0])
                    raise CellError(
                        source,
                        st.name,
                        row,
                        f"{raw[st.name][row]:g} is out of range: scaled by the"
                        " run's preprocessing it overflows the model's float32 input",
                        csv,
                    )
        return x

    @property
    def offsets(self) -> list[int]:
        """Each column's first position in a row of features."""
        return list(accumulate((c.width for c in self.columns[:-1]), initial=0))[: len(self.columns)]

    def column_at(self, j: int) -> str:
        """The column that feature ``j`` of a (flattened) row comes from."""
        for st, start in zip(self.columns, self.offsets):
            if start <= j < start + st.width:
                return st.name
        raise IndexError(j)

    # --- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "task": self.task,
            "classes": self.classes,
            "shape": self.shape,
            "columns": [{k: v for k, v in vars(c).items() if not k.startswith("_")} for c in self.columns],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessor":
        return cls(
            [ColumnStats(**c) for c in d["columns"]], d["target"], d["task"], d["classes"], d.get("shape")
        )


def column_is_missing(values: np.ndarray, kind: str) -> np.ndarray:
    if kind == "numeric":
        return np.isnan(values)
    return np.array([v is None for v in values], dtype=bool)
