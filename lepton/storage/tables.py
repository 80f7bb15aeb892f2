"""Reading raw tabular data (CSV, Parquet, NumPy .npz; local path or fsspec URL) into columns.

Columns come back as a ``pyarrow.Table``; type decisions (numeric vs categorical) are made later by
``preprocess`` so that training and prediction read raw rows the same way.
"""
from __future__ import annotations

import io
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from ..errors import DataError

SUFFIXES = ((".csv", "csv"), (".csv.gz", "csv"), (".tsv", "csv"), (".parquet", "parquet"), (".pq", "parquet"),
            (".npz", "npz"))
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
    if "://" not in path and Path(path).is_dir():      # "no format" would send the user the wrong way
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
    except OSError as e:      # NotADirectoryError, PermissionError, a network filesystem's errors
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    except (ValueError, ImportError) as e:  # unknown protocol, missing fsspec backend
        raise DataError(f"{path}: cannot open: {e}") from None


def read_table(path: str, fmt: str | None = None) -> pa.Table:
    """Read the whole file; raises ``DataError`` naming the file for anything unreadable."""
    kind = detect_format(path, fmt)
    raw = _open_bytes(path)
    table = _parse(path, kind, raw)
    # pyarrow keeps repeated names, but then cannot look either column up by name
    repeated = [f"'{n}' ({k} times)" for n, k in Counter(table.column_names).items() if k > 1]
    if repeated:
        raise DataError(f"{path}: duplicate column name(s) {', '.join(repeated)}; every column needs its own name")
    return table


def _parse(path: str, kind: str, raw: bytes) -> pa.Table:
    try:
        if kind == "csv":
            import pyarrow.csv as pacsv
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
            return pacsv.read_csv(
                io.BytesIO(raw),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        if kind == "parquet":
            import pyarrow.parquet as pq
            return pq.read_table(io.BytesIO(raw))
        return _npz_table(raw)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse as {kind}: {str(e).splitlines()[0]}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:    # the last three: a damaged .npz
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
