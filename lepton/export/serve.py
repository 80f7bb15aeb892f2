"""``lepton serve RUN_DIR|EXPORT --bind HOST:PORT``: a small HTTP prediction endpoint.

    POST /v1/predict   {"rows": [{"col": value, ...}, ...]}
                       → 200 {"predictions": [...], "probabilities": [[...], ...], "classes": [...]}
                         (regression: {"predictions": [...]})
    GET  /healthz      → 200 {"status": "ok", "model": ..., "features": [...], ...}

Contract:
- rows are raw feature values, as in the training file; the run's preprocessing (saved with the model
  or embedded in the artifact) is applied, so the answer equals ``lepton predict`` on the same rows;
- every row must have exactly the model's feature columns; a numeric column takes a JSON number (or
  null where the run fitted a fill value), a categorical column a string or number;
- a bad request gets a 4xx with ``{"error": "<one line naming the row and column>"}``: 400 a body that
  cannot be parsed (malformed JSON, nested too deeply), 413 body over ``max_body`` bytes (default 1 MiB),
  422 a body that is JSON but not a valid request (missing/unknown columns, non-numeric values, no
  rows) or a value the model cannot take (infinite, overflowing float32 once scaled, so large that
  the model's output is not finite). Cells are named ``rows[i].column`` with ``i`` counted from 0.
  The server keeps serving after any bad request; an unexpected failure is a 500 with its message,
  and the server keeps serving too.
- on start, the first line on stdout is ``serving on http://HOST:PORT`` (the real port when the bind
  asked for port 0), so a supervisor or a test can read where it listens.
"""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pyarrow as pa
import uvicorn
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotations here
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..errors import LeptonError
from ..predict import Predictor
from ..storage.preprocess import CellError

MAX_BODY = 1 << 20
# An oversized body is still read (and discarded) up to this many times max_body before answering 413,
# so that a client that is still sending gets the answer instead of a reset connection; beyond it the
# connection is closed.
DRAIN_FACTOR = 16


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_int(text: str):
    # json.loads makes int(text) of every integer: past 4300 digits Python refuses (ValueError, and the
    # whole body fails), and past float64 the int fails float() later (OverflowError). A long one is
    # read as a float instead (inf past float64), which rows_to_table refuses with a 422 naming its cell.
    return int(text) if len(text) <= 300 else float(text)


def parse_body(body: bytes):
    """The decoded JSON document; a ``RequestError`` 400 for anything that is not parseable JSON."""
    try:
        return json.loads(body, parse_int=_parse_int)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"malformed JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError, and any other refusal of the decoder
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:  # e.g. 100000 nested '['
        raise RequestError(400, "malformed JSON: nested too deeply") from None


def rows_to_table(doc, predictor: Predictor) -> pa.Table:
    """Validate a decoded request body against the model's feature columns; a typed Arrow table."""
    pre = predictor.preprocessor
    if not isinstance(doc, dict):
        raise RequestError(422, 'expected a JSON object {"rows": [{column: value, ...}, ...]}')
    extra = [k for k in doc if k != "rows"]
    if extra:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, extra))} (expected only 'rows')")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise RequestError(422, "rows: expected a non-empty list of objects {column: value, ...}")
    names = pre.feature_names
    known = set(names)
    cols: dict[str, list] = {n: [] for n in names}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RequestError(
                422, f"rows[{i}]: expected an object {{column: value}}, got {type(row).__name__}"
            )
        missing = [n for n in names if n not in row]
        if missing:
            raise RequestError(
                422,
                f"rows[{i}]: missing feature column(s) {', '.join(map(repr, missing))}"
                f" (the model needs: {', '.join(names)})",
            )
        unknown = [k for k in row if k not in known]
        if unknown:
            raise RequestError(
                422,
                f"rows[{i}]: unknown column(s) {', '.join(map(repr, unknown))}"
                f" (the model needs: {', '.join(names)})",
            )
        for st in pre.columns:
            v = row[st.name]
            if st.kind == "numeric":
                if v is not None and not _number(v):
                    raise RequestError(422, f"rows[{i}].{st.name}: expected a number, got {v!r}")
                try:
                    f = None if v is None else float(v)
                except OverflowError:  # an integer beyond float64
                    f = math.inf
                if f is not None and math.isnan(f):
                    raise RequestError(422, f"rows[{i}].{st.name}: expected a number, got NaN")
                if f is not None and math.isinf(f):  # 1e400, Infinity, or a long integer (_parse_int)
                    raise RequestError(
                        422,
                        f"rows[{i}].{st.name}: out of range: the value is infinite or"
                        " beyond float64 (|x| > 1.8e308)",
                    )
                cols[st.name].append(f)
            else:
                # a JSON true matches a category 'true' or 'True' (ColumnStats.category_index)
                if v is not None and not (isinstance(v, (str, bool)) or _number(v)):
                    raise RequestError(
                        422, f"rows[{i}].{st.name}: expected a string, number or boolean, got {v!r}"
                    )
                cols[st.name].append(None if v is None else str(v))
    return pa.table(
        {
            st.name: pa.array(cols[st.name], type=pa.float64() if st.kind == "numeric" else pa.string())
            for st in pre.columns
        }
    )


def predict_response(predictor: Predictor, table: pa.Table) -> dict:
    try:
        result = predictor.predict_table(table, "request")
    except CellError as e:  # a null where the run fitted no fill value, a value out of range
        raise RequestError(422, e.as_list_item()) from None  # rows[i].column, as every other message
    except LeptonError as e:
        raise RequestError(422, str(e)) from None
    preds = result["prediction"]
    out = {"predictions": preds.tolist() if hasattr(preds, "tolist") else list(preds)}
    if "probabilities" in result:
        out["probabilities"] = result["probabilities"].tolist()
        out["classes"] = predictor.classes
    return out


def make_app(predictor: Predictor, max_body: int = MAX_BODY):
    """The FastAPI application serving ``predictor`` (see module doc)."""

    app = FastAPI(title="lepton serve", docs_url=None, redoc_url=None, openapi_url=None)
    info = {
        "status": "ok",
        "model": predictor.meta.get("name"),
        **predictor.describe(),
        "features": predictor.preprocessor.feature_names,
        "classes": predictor.classes,
        "max_body_bytes": max_body,
    }

    def error(status: int, message: str, close: bool = False) -> JSONResponse:
        return JSONResponse(
            {"error": message}, status_code=status, headers={"Connection": "close"} if close else None
        )

    @app.get("/healthz")
    async def healthz():
        return info

    drain_limit = DRAIN_FACTOR * max_body

    @app.post("/v1/predict")
    async def predict(request: Request):
        declared = request.headers.get("content-length")
        too_big = f"request body is larger than {max_body} bytes; send fewer rows per request"
        if declared is not None and declared.isdigit() and int(declared) > drain_limit:
            return error(413, too_big, close=True)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > drain_limit:
                    return error(413, too_big, close=True)
                if size <= max_body:
                    chunks.append(chunk)
        except ClientDisconnect:  # gone before its body was complete: nobody to answer, nothing to log
            return Response(status_code=400)
        if size > max_body:
            return error(413, too_big)
        try:
            doc = parse_body(b"".join(chunks))
            table = rows_to_table(doc, predictor)
            # the reply is rendered here, inside the try: a value JSON cannot carry (NaN) is then a 500
            # with its message like any other bug, not an exception in the framework's plain-text handler
            return JSONResponse(await run_in_threadpool(predict_response, predictor, table))
        except RequestError as e:
            return error(e.status, e.message)
        except Exception as e:  # a bug: answer it, log it, keep serving
            print(f"lepton serve: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return error(500, f"internal error: {type(e).__name__}: {e}")

    return app


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LeptonError(f"--bind {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def serve(predictor: Predictor, target: str | Path, host: str, port: int, max_body: int = MAX_BODY) -> int:
    """Listen, serve ``predictor`` (``lepton.load(target)``) until interrupted."""
    sock = _listen(host, port)
    real_port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    app = make_app(predictor, max_body)
    # the socket is already listening: a client that reads this line and connects at once is queued
    print(f"serving on http://{url_host}:{real_port}", flush=True)
    d = predictor.describe()
    print(
        f"model {predictor.meta.get('name')!r} ({d['format']} {d['precision']}, {d['task']}) from {target};"
        f" POST /v1/predict, GET /healthz",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0
