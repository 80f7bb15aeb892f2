"""Reading raw tabular data (CSV, Parquet, NumPy .npz; local path or fsspec URL) into columns.

Columns come back as a ``pyarrow.Table``; type decisions (numeric vs categorical) are made later by
``preprocess`` so that training and prediction read raw rows the same way.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections import Counter
from collections.abc import Collection
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from ..errors import DataError

SUFFIXES = (
    (".csv", "csv"),
    (".csv.gz", "csv"),
    (".tsv", "csv"),
    (".parquet", "parquet"),
    (".pq", "parquet"),
    (".npz", "npz"),
)
# what to do when the name tells no format; the default fits a job's data.path, a caller with no such
# option (lepton predict) passes its own
SET_FORMAT = "set data.format to csv, parquet or npz"


def detect_format(path: str, fmt: str | None = None, hint: str = SET_FORMAT) -> str:
    if fmt:
        return fmt
    name = PurePosixPath(path.split("?")[0]).name.lower()
    for suffix, kind in SUFFIXES:
        if name.endswith(suffix):
            return kind
    if "://" not in path and Path(path).is_dir():  # "no format" would send the user the wrong way
        raise DataError(f"{path}: is a directory, not a data file")
    raise DataError(f"{path}: cannot tell the format from the file name; {hint}")


def _open_bytes(path: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file") from None
    except OSError as e:  # NotADirectoryError, PermissionError, a network filesystem's errors
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    except (ValueError, ImportError) as e:  # unknown protocol, missing fsspec backend
        raise DataError(f"{path}: cannot open: {e}") from None


def read_table(
    path: str, fmt: str | None = None, categorical: Collection[str] = (), text: Collection[str] = ()
) -> pa.Table:
    """Read the whole file; raises ``DataError`` naming the file for anything unreadable.

    ``categorical``: columns whose values are categories. A CSV column of those that pyarrow typed as
    floating point, where float64 changes a value, is the text written instead: float64 keeps 17
    significant digits, so two 20-digit IDs (hashed uint64 user or item IDs) would become one category,
    silently. Every other column keeps pyarrow's reading, which makes ``2`` and ``2.0`` one category
    (``ColumnStats.category_index`` matches the spellings at prediction).
    ``text``: CSV columns read as the text written, whatever pyarrow would type them (a model whose
    categories hold two spellings of one value, ``01234`` and ``1234``, tells them apart only so)."""
    kind = detect_format(path, fmt)
    raw = _open_bytes(path)
    table = _parse(path, kind, raw)
    try:
        names = table.column_names
    except UnicodeDecodeError:
        raise DataError(f"{path}: the header is not UTF-8 text; save the file as UTF-8") from None
    # pyarrow keeps repeated names, but then cannot look either column up by name
    repeated = [f"'{n}' ({k} times)" for n, k in Counter(names).items() if k > 1]
    if repeated:
        raise DataError(
            f"{path}: duplicate column name(s) {', '.join(repeated)}; every column needs its own name"
        )
    keep = [c for c in dict.fromkeys(text) if c in names and not pa.types.is_string(table.column(c).type)]
    floats = [
        c for c in categorical if c in names and c not in keep and pa.types.is_floating(table.column(c).type)
    ]
    if kind == "csv" and (floats or keep):
        written = _parse(path, kind, raw, text=floats + keep)
        for c in keep + [c for c in floats if any(_float_changes(v) for v in written.column(c).to_pylist())]:
            table = table.set_column(names.index(c), c, written.column(c))
    return table


def check_used_columns(table: pa.Table, columns: list[str], path: str) -> None:
    """The columns a job or a prediction reads must have a name and hold numbers or text: pyarrow reads
    a CSV column with a non-UTF-8 byte (and Parquet/.npz byte strings) as binary. Columns nobody reads
    may be anything."""
    for c in columns:
        if not c.strip():
            raise DataError(
                f"{path}: column {table.column_names.index(c) + 1} has no name in the header;"
                " every column the job reads needs one"
            )
        col = table.column(c)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            row = next((i for i, v in enumerate(col.to_pylist()) if v is not None and not _utf8(v)), None)
            what = (
                f" row {row + 1}: bytes that are not UTF-8 text" if row is not None else ": bytes, not text"
            )
            raise DataError(f"{path}: column '{c}'{what} (a CSV must be saved as UTF-8)")


def _float_changes(text: str | None) -> bool:
    """Whether float64 reads the number ``text`` as another value than written (more digits than it
    keeps: ``12345678901234567891``); its shortest text (``0.1``) counts as the same value."""
    if text is None or (len(text) <= 15 and "e" not in text.lower()):
        return False  # at most 15 digits and no exponent: float64 keeps it exactly
    try:
        written = Decimal(text)
        return written.is_finite() and Decimal(repr(float(text))) != written
    except (ValueError, InvalidOperation):  # text pyarrow parses and Decimal or float does not
        return False


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _ragged_line(raw: bytes, delimiter: str) -> int | None:
    """The line of the first CSV row whose field count differs from the header's (pyarrow's message
    quotes the row but not where it is)."""
    import csv

    rows = csv.reader(io.StringIO(raw.decode("utf-8", errors="replace"), newline=""), delimiter=delimiter)
    width = None
    for row in rows:
        if width is None:
            width = len(row)
        elif row and len(row) != width:
            return rows.line_num
    return None


def _parse(path: str, kind: str, raw: bytes, text: Collection[str] = ()) -> pa.Table:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    try:
        if kind == "csv":
            import pyarrow.csv as pacsv

            return pacsv.read_csv(
                io.BytesIO(raw),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                # ``text``: only those columns, as text (a second reading of a few columns)
                convert_options=pacsv.ConvertOptions(
                    strings_can_be_null=True,
                    column_types={c: pa.string() for c in text},
                    include_columns=list(text),
                ),
            )
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(io.BytesIO(raw))
        return _npz_table(raw)
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0]
        line = _ragged_line(raw, delimiter) if kind == "csv" and "Expected" in msg else None
        where = f" line {line}:" if line else ""
        raise DataError(f"{path}:{where} cannot parse as {kind}: {msg}") from None
    except (
        ValueError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
    ) as e:  # the last three: a damaged .npz
        raise DataError(f"{path}: cannot read as {kind}: {e}") from None


def _npz_table(raw: bytes) -> pa.Table:
    """An .npz becomes columns: a 1-D array is one column named after its key, an N-D array of
    shape (rows, ...) becomes columns ``key_0 .. key_{m-1}`` (row-major flattening)."""
    arrays = np.load(io.BytesIO(raw), allow_pickle=False)
    cols: dict[str, np.ndarray] = {}
    rows = None
    for key in arrays.files:
        a = arrays[key]
        if a.ndim == 0:
            continue
        if rows is None:
            rows = a.shape[0]
        elif a.shape[0] != rows:
            raise ValueError(f"array '{key}' has {a.shape[0]} rows, others have {rows}")
        if a.ndim == 1:
            cols[key] = a
        else:
            flat = a.reshape(rows, -1)
            for j in range(flat.shape[1]):
                cols[f"{key}_{j}"] = np.ascontiguousarray(flat[:, j])
    return pa.table(cols)
