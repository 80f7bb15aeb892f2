"""TLS for a control plane that leaves loopback: a certificate authority of the run's own.

A coordinator bound to an address other than loopback serves HTTPS (``lepton coordinator --tls auto``, the
default; ``on``/``off`` force it). On first use the run gets a CA (an ECDSA P-256 key, self-signed) and
a server certificate signed by it for the bound address (an IP or DNS subject alternative name; a
wildcard bind gets this host's name and addresses), both under ``RUN_DIR/tls/``, keys mode 0600. A
resumed coordinator keeps the CA, so workers that trust it stay valid, and issues a new server
certificate when the address changed.

A worker trusts exactly that CA (not the system's): the join file ``RUN_DIR/join`` (mode 0600) holds
the URL, the token and the CA in one JSON object, and ``lepton worker --join FILE`` reads it; or
``--coordinator https://... --token-file T --ca-file RUN_DIR/tls/ca.pem``. The data plane (gloo, the
TCPStore) is not encrypted: it binds the cluster interface only (comm/net.py), as in every peer.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..storage.backend import LocalStorage
from ..storage.rundir import RunDir

TLS_DIR = "tls"
CA_PEM, CA_KEY = f"{TLS_DIR}/ca.pem", f"{TLS_DIR}/ca.key"
SERVER_PEM, SERVER_KEY = f"{TLS_DIR}/server.pem", f"{TLS_DIR}/server.key"
JOIN = "join"
_VALID = datetime.timedelta(days=3650)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def wants_tls(mode: str, host: str) -> bool:
    """``--tls auto|on|off`` for a coordinator bound to ``host``: auto is on unless ``host`` is loopback."""
    if mode == "auto":
        return not (host in LOOPBACK or host.startswith("127."))
    return mode == "on"


@dataclass(frozen=True)
class ServerTls:
    certfile: Path
    keyfile: Path
    ca_pem: str


def _names(host: str) -> list:
    from cryptography import x509

    if host in ("0.0.0.0", "::", ""):  # every interface: this host's name and the addresses it has
        hosts = {socket.gethostname(), "localhost", "127.0.0.1"}
        try:
            hosts |= {str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
    else:
        hosts = {host}
    out: list = []
    for h in sorted(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(subject: str, key, issuer: str, signer, *, ca: bool, names: list | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of hosts differ a little
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        b = b.add_extension(x509.SubjectAlternativeName(names or []), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return b.sign(signer, hashes.SHA256())


def server_tls(run: RunDir, host: str) -> ServerTls:
    """The run's CA (made once) and a server certificate for ``host`` (made when missing or for another
    address); uvicorn reads them from the run's folder."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    st = run.storage
    if st.exists(CA_PEM) and st.exists(CA_KEY):
        ca_cert = x509.load_pem_x509_certificate(st.read(CA_PEM))
        ca_key = serialization.load_pem_private_key(st.read(CA_KEY), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _certificate("Lepton run CA", ca_key, "Lepton run CA", ca_key, ca=True)
        st.write(CA_KEY, _pem_key(ca_key), mode=0o600)
        st.write(CA_PEM, ca_cert.public_bytes(serialization.Encoding.PEM))
    names = _names(host)
    current = None
    if st.exists(SERVER_PEM) and st.exists(SERVER_KEY):
        current = x509.load_pem_x509_certificate(st.read(SERVER_PEM))
        san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        try:
            current.verify_directly_issued_by(ca_cert)  # every run's CA has the same name: its signature
            signed = True
        except (ValueError, TypeError, InvalidSignature):
            signed = False
        if set(san) != set(names) or not signed:
            current = None
    if current is None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(host or "lepton", key, "Lepton run CA", ca_key, ca=False, names=names)
        st.write(SERVER_KEY, _pem_key(key), mode=0o600)
        st.write(SERVER_PEM, cert.public_bytes(serialization.Encoding.PEM))
    if run.is_local:
        return ServerTls(run.root / SERVER_PEM, run.root / SERVER_KEY, st.read(CA_PEM).decode())
    # uvicorn reads files: on object storage, copies in a folder only this user can read (the key)
    local = Path(tempfile.mkdtemp(prefix="lepton-tls-"))
    for rel in (SERVER_PEM, SERVER_KEY):
        LocalStorage(local).write(rel.rpartition("/")[2], st.read(rel), mode=0o600)
    return ServerTls(local / "server.pem", local / "server.key", st.read(CA_PEM).decode())


def write_join(run: RunDir, url: str, token: str, ca_pem: str | None) -> Path | str:
    """``RUN_DIR/join``: what a worker needs, in one file to copy to its host (mode 0600: the token);
    where it is (a URL on object storage: ``lepton worker --join`` reads it there too)."""
    body = {"url": url, "token": token, **({"ca": ca_pem} if ca_pem else {})}
    run.storage.write(JOIN, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)
    return run.locate(JOIN)
