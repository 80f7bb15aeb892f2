"""Where a request is authenticated: the one check of the job's token, for the control API
(``server.py``) and the dashboard (``dashboard.py``), invariant 6.

- The control API takes ``Authorization: Bearer <token>`` only (``bearer_dependency``).
- The dashboard's data routes and ``/metrics`` take the same header (scripts, Prometheus) or the
  dashboard's cookie (``token_or_cookie_dependency``): a browser cannot send a bearer header when it
  navigates, so ``GET /dashboard?token=T`` (``dashboard_url``) sets an HttpOnly cookie named after a
  hash of the token (``cookie_name``: two coordinators on one host keep their own cookies).

- A worker speaks only for itself: registration issues it a credential, an HMAC-SHA256 of its
  worker id under the coordinator's key (``RUN_DIR/worker_key``, mode 0600, never sent anywhere;
  ``WorkerCredentials``). Heartbeat, plan and report carry it in the ``X-Lepton-Worker-Credential``
  header, checked against the worker id the message claims: a 403 otherwise. Nothing is stored per
  worker, so a coordinator restarted with ``--resume`` (same run directory, same key) still verifies
  the workers it adopts from their heartbeats, and a token holder without the run directory cannot
  speak for a worker it is not.

Every comparison is constant-time (``hmac.compare_digest``); a refusal is a 401 with
``WWW-Authenticate: Bearer`` (a 403 for a worker credential that does not match). ``GET /healthz``
and ``GET /`` (a redirect to the dashboard that carries no secret) are the routes without the token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional
from urllib.parse import quote

from fastapi import Header, HTTPException, Request


def same_secret(given: Optional[str], expected: str) -> bool:
    """``given`` equals ``expected``, compared in constant time; a missing value never does."""
    # surrogatepass: a JSON string may hold a lone surrogate, which plain ``encode`` refuses
    return given is not None and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def bearer_ok(authorization: Optional[str], token: str) -> bool:
    """The ``Authorization`` header's value carries ``token`` as a bearer token."""
    return same_secret(authorization, f"Bearer {token}")


def cookie_name(token: str) -> str:
    return "lepton_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def dashboard_url(base_url: str, token: str) -> str:
    """The address to open in a browser: ``lepton train`` and ``lepton coordinator`` print it."""
    return f"{base_url.rstrip('/')}/dashboard?token={quote(token, safe='')}"


def request_authorized(request: Request, token: str) -> bool:
    """The bearer header or the dashboard's cookie carries ``token``."""
    return bearer_ok(request.headers.get("authorization"), token) or same_secret(
        request.cookies.get(cookie_name(token)), token
    )


class WorkerCredentials:
    """Issues and checks per-worker credentials: ``HMAC-SHA256(key, worker_id)`` in hex."""

    def __init__(self, key: bytes):
        self._key = key

    def issue(self, worker_id: str) -> str:
        return hmac.new(self._key, worker_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def verify(self, worker_id: str, credential: Optional[str]) -> bool:
        return same_secret(credential, self.issue(worker_id))


def not_this_worker(worker_id: str) -> HTTPException:
    return HTTPException(
        status_code=403, detail=f"missing or wrong worker credential for worker {worker_id[:128]!r}"
    )


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
    )


def bearer_dependency(token: str):
    """A FastAPI dependency refusing a request without the bearer header (the control API). Async:
    a plain ``def`` dependency runs on a thread of FastAPI's pool, which the hot endpoints
    (heartbeat, plan, report) cannot afford (server.py)."""

    async def auth(authorization: Optional[str] = Header(default=None)) -> None:
        if not bearer_ok(authorization, token):
            raise unauthorized()

    return auth


def token_or_cookie_dependency(token: str):
    """A FastAPI dependency refusing a request with neither the bearer header nor the cookie (the
    dashboard's assets, data and ``/metrics``)."""

    def require(request: Request) -> None:
        if not request_authorized(request, token):
            raise unauthorized()

    return require
