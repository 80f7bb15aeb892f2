"""Where a request is authenticated: the one check of the job's token, for the control API
(``server.py``) and the dashboard (``dashboard.py``), invariant 6.

- The control API takes ``Authorization: Bearer <token>`` only (``bearer_dependency``).
- The dashboard's data routes and ``/metrics`` take the same header (scripts, Prometheus) or the
  dashboard's cookie (``token_or_cookie_dependency``): a browser cannot send a bearer header when it
  navigates, so ``GET /dashboard?token=T`` (``dashboard_url``) sets an HttpOnly cookie named after a
  hash of the token (``cookie_name``: two coordinators on one host keep their own cookies).

Every comparison is constant-time (``hmac.compare_digest``); a refusal is a 401 with
``WWW-Authenticate: Bearer``. ``GET /healthz`` is the one route without the token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional
from urllib.parse import quote

from fastapi import Header, HTTPException, Request


def same_secret(given: Optional[str], expected: str) -> bool:
    """``given`` equals ``expected``, compared in constant time; a missing value never does."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


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
