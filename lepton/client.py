"""HTTP client for the coordinator's control API (workers and ``lepton status`` use it)."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path

import httpx

from .errors import LeptonError, first_line
from .protocol import (
    CREDENTIAL_HEADER,
    AnyReport,
    Heartbeat,
    HeartbeatResponse,
    PlanResponse,
    RegisterRequest,
    RegisterResponse,
)
from .storage.backend import is_url


def read_token(token_file: str | None) -> str:
    """The bearer token from ``--token-file`` or ``LEPTON_TOKEN``."""
    if token_file:
        p = token_file if is_url(token_file) else Path(token_file)
        if isinstance(p, Path) and p.is_dir():
            raise LeptonError(f"{p}: is a folder; --token-file names the run's token file (RUN_DIR/token)")
        try:
            token = _read_text(p).strip()
        except FileNotFoundError:
            raise LeptonError(f"{p}: token file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LeptonError(f"{p}: cannot read the token file ({e})") from None
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise LeptonError(f"{p}: not a token file (empty, or more than one word); use RUN_DIR/token")
        return token
    env = os.environ.get("LEPTON_TOKEN")
    if not env:
        raise LeptonError("no token: pass --token-file FILE (RUN_DIR/token) or set LEPTON_TOKEN")
    return env.strip()


def _read_text(p: str | Path) -> str:
    """A local file's text, or an fsspec URL's (the run directory on object storage)."""
    if isinstance(p, Path):
        return p.read_text()
    import fsspec

    try:
        with fsspec.open(p, "rb") as f:
            return f.read().decode()
    except ImportError as e:
        raise OSError(first_line(e)) from None


def read_join(path: str, wait_s: float = 0.0) -> tuple[str, str, str | None]:
    """(URL, token, CA PEM or None) from a join file (``RUN_DIR/join``, coordinator/tls.py): a local
    file, or the run's own on object storage (``s3://bucket/run/join``). ``wait_s``: how long to wait
    for it to appear (a worker its engine starts together with the coordinator, which writes it)."""
    p = path if is_url(path) else Path(path)
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            text = _read_text(p)
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise LeptonError(f"{p}: join file not found") from None
            if not said:
                print(f"lepton worker: waiting up to {wait_s:g} s for the join file {p}", flush=True)
                said = True
            time.sleep(1.0)
        except (OSError, UnicodeDecodeError):
            text = ""  # unreadable: the error below
            break
    try:
        body = json.loads(text)
        url, token, ca = body["url"], body["token"], body.get("ca")
        if not isinstance(url, str) or not isinstance(token, str) or not isinstance(ca, (str, type(None))):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise LeptonError(f"{p}: not a join file (RUN_DIR/join: JSON with url, token and ca)") from None
    return url, token, ca


def read_ca(ca_file: str | None) -> str | None:
    """The PEM of ``--ca-file`` (the run's CA, RUN_DIR/tls/ca.pem), or None."""
    if not ca_file:
        return None
    p = ca_file if is_url(ca_file) else Path(ca_file)
    try:
        pem = _read_text(p)
    except FileNotFoundError:
        raise LeptonError(f"{p}: CA file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LeptonError(f"{p}: cannot read the CA file ({e})") from None
    if "BEGIN CERTIFICATE" not in pem:
        raise LeptonError(f"{p}: not a PEM certificate (use RUN_DIR/tls/ca.pem)")
    return pem


def verify_with(ca_pem: str | None) -> ssl.SSLContext | bool:
    """What httpx verifies an https coordinator against: the run's CA only, when given; else the
    system's store (a coordinator behind a certificate of the user's own)."""
    if ca_pem is None:
        return True
    try:
        return ssl.create_default_context(cadata=ca_pem)
    except ssl.SSLError as e:
        raise LeptonError(f"the CA certificate is not usable ({e})") from None


class CoordinatorUnreachable(LeptonError):
    """No answer from the coordinator (not started yet, restarting, or gone)."""


class CoordinatorClient:
    """``credential``: the worker's own (``RegisterResponse.credential``); ``register`` stores the one
    it is issued, and every later call sends it (a heartbeat, plan or report speaks for one worker)."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 10.0,
        credential: str | None = None,
        ca: str | None = None,
    ):
        self.url = url.rstrip("/")
        try:
            self._http = httpx.Client(
                base_url=self.url,
                timeout=timeout_s,
                headers={"Authorization": f"Bearer {token}"},
                verify=verify_with(ca),
            )
        except httpx.InvalidURL as e:
            raise LeptonError(f"{url}: not a coordinator URL ({e}); expected http://HOST:PORT") from None
        self.credential: str | None = None
        if credential:
            self.use_credential(credential)

    def use_credential(self, credential: str) -> None:
        self.credential = credential
        self._http.headers[CREDENTIAL_HEADER] = credential

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:  # before TransportError, its base
            raise LeptonError(f"{self.url}: not a coordinator URL ({e}); expected http://HOST:PORT") from None
        except httpx.ConnectError as e:
            if isinstance(e.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(e):
                # a coordinator that is not the one the CA names: retrying will not change that
                raise LeptonError(
                    f"{self.url}: the coordinator's certificate is not signed by the run's CA ({e})"
                ) from None
            raise CoordinatorUnreachable(f"cannot reach the coordinator at {self.url}: {e}") from None
        except httpx.RemoteProtocolError as e:  # closed without an answer: restarting, or TLS spoken to
            hint = " (is it an https:// coordinator?)" if self.url.startswith("http://") else ""
            raise CoordinatorUnreachable(f"no answer from the coordinator at {self.url}{hint}: {e}") from None
        except httpx.TransportError as e:
            raise CoordinatorUnreachable(f"cannot reach the coordinator at {self.url}: {e}") from None
        if r.status_code == 401:
            raise LeptonError(f"the coordinator at {self.url} refused the token (401)")
        if r.status_code == 403:
            raise LeptonError(f"the coordinator at {self.url} refused this worker's credential (403)")
        if r.status_code >= 400:
            try:  # a refusal with a reason (FastAPI's {"detail": "..."}): the reason, whole
                detail = r.json().get("detail")
            except ValueError:
                detail = None
            if isinstance(detail, str):
                raise LeptonError(f"the coordinator refused {method} {path} ({r.status_code}): {detail}")
            raise LeptonError(f"coordinator {method} {path}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def register(self, req: RegisterRequest, wait_s: float = 0.0) -> RegisterResponse:
        """Register; while the coordinator is unreachable, retry with backoff for up to ``wait_s``
        (a worker may start before its coordinator, e.g. under a cluster manager)."""
        deadline = time.monotonic() + wait_s
        delay = 0.1
        while True:
            try:
                reg = RegisterResponse.model_validate(
                    self._call("POST", "/v1/register", json=req.model_dump())
                )
                self.use_credential(reg.credential)
                return reg
            except CoordinatorUnreachable:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def plan(self, worker_id: str) -> PlanResponse:
        return PlanResponse.model_validate(self._call("GET", "/v1/plan", params={"worker_id": worker_id}))

    def heartbeat(self, hb: Heartbeat) -> HeartbeatResponse:
        return HeartbeatResponse.model_validate(
            self._call("POST", "/v1/heartbeat", json=hb.model_dump(mode="json"))
        )

    def report(self, r: AnyReport) -> None:
        self._call("POST", "/v1/report", json=r.model_dump(mode="json"))

    def status(self) -> dict:
        return self._call("GET", "/v1/status")

    def close(self) -> None:
        self._http.close()
