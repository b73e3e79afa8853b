"""TLS between the controller and its workers, pinned by certificate fingerprint.

Workers and their controller may sit in different clouds, so the fleet secret and every prompt
would otherwise cross the internet in clear. No certificate authority is involved: each server
makes (or is given) a self-signed certificate, and the side that connects checks the SHA-256
fingerprint of the certificate it is shown against the one it was told to expect.

- The controller's certificate is made by the launcher once per fleet and kept with the fleet's
  state, so a relaunched controller shows the same one: its private key travels as the SkyPilot
  secret VICUNA_SKY_FLEET_TLS, its fingerprint (public) as an env of the worker jobs. A worker
  that expects another fingerprint never sends the fleet secret: the handshake fails first.
- Each worker makes its own certificate at start and sends its fingerprint in its registration
  (itself over the pinned connection, with the fleet secret); the controller pins it on every
  request it sends that worker.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from pathlib import Path

import aiohttp

FLEET_TLS_ENV = "VICUNA_SKY_FLEET_TLS"
"""The controller's private key and certificate, PEM, one after the other."""
CLIENT_TLS_ENV = "VICUNA_SKY_CLIENT_TLS"
"""The client port's and the chat UI's key and certificate (PEM) when the operator brings one
(a CA-signed certificate for a domain); else they show the fleet's, pinned by fingerprint."""


class TlsError(ValueError):
    """Unusable TLS material (the message says which and why)."""


def make_certificate(name: str = "vicuna-sky fleet") -> str:
    """A new self-signed certificate and its private key (P-256), as one PEM text. Names and
    addresses in it do not matter: the peer checks the fingerprint, not the host name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return (key_pem + cert.public_bytes(serialization.Encoding.PEM)).decode()


def fingerprint(pem: str) -> str:
    """The SHA-256 fingerprint of the certificate in `pem`, as 64 lowercase hex digits."""
    start = pem.find("-----BEGIN CERTIFICATE-----")
    if start < 0:
        raise TlsError("no certificate in the TLS material")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem[start : pem.index("-----END CERTIFICATE-----") + 25])
    except ValueError as e:
        raise TlsError(f"unreadable certificate: {e}") from None
    return hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str) -> bytes:
    """A fingerprint as given by a user or a registration (hex, colons and case ignored)."""
    digits = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise TlsError(f"not a SHA-256 fingerprint (64 hex digits): {text[:80]!r}")
    return bytes.fromhex(digits)


def certificate_pem(pem: str) -> str:
    """The certificate alone of `pem` (key + certificate): what may be shown to anyone."""
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise TlsError("no certificate in the TLS material")
    return pem[start : end + len("-----END CERTIFICATE-----")] + "\n"


def trusting(pem: str) -> ssl.SSLContext:
    """A client context that trusts one certificate, the one in `pem`, and nothing else: no CA,
    no host name (the fleet's certificate names none). Only its key's holder can show it or
    sign another, so this pins it as surely as its fingerprint; httpx, and through it the
    openai client, take it as `verify=`."""
    context = ssl.create_default_context(cadata=certificate_pem(pem))
    context.check_hostname = False
    # An operator's CA-signed certificate is trusted as itself, without its CA.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def pinned(text: str) -> aiohttp.Fingerprint:
    """What aiohttp checks the peer's certificate against (instead of a CA chain)."""
    return aiohttp.Fingerprint(parse_fingerprint(text))


def server_files(pem: str) -> tuple[str, str]:
    """(certfile, keyfile) holding `pem` for a server that reads them by path (uvicorn): a
    private directory of this process, removed at exit."""
    fingerprint(pem)  # refuse material without a certificate before anything is written
    if "PRIVATE KEY-----" not in pem:
        raise TlsError("no private key in the TLS material")
    folder = Path(tempfile.mkdtemp(prefix="vicuna-sky-tls-"))  # mode 0700
    path = folder / "server.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    import atexit
    import shutil

    atexit.register(shutil.rmtree, folder, True)
    try:  # a key that does not match its certificate fails here, in one line, not in uvicorn
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(path, path)
    except ssl.SSLError as e:
        raise TlsError(f"the TLS key and certificate do not load: {e.reason or e}") from None
    return str(path), str(path)
