"""What a re-run of `serve --fleet` must know about the fleet it repairs: its secret, its
controller's TLS certificate (the one the workers pin), and where the controller was.

Kept in a 0600 file, never in a task's envs: under ~/.vicuna-sky for cloud fleets (the
launcher's state), under the runs directory for local ones (with the ports the workers use).
A cloud fleet's certificate and key also live in its bucket, sealed with a key drawn from the
fleet secret (AES-GCM): a teammate who repairs the fleet from another machine, with the secret
exported, gets the certificate its workers pin; without the secret the object is noise.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.serve.tls import certificate_pem, fingerprint, make_certificate

SEALED_KEY = "tls.sealed"
"""The sealed certificate and key, under `<bucket>/fleets/<name>/`."""


def state_dir() -> Path:
    """Where the launcher keeps what it must remember between runs (a fleet's secret)."""
    return Path(os.environ.get("VICUNA_SKY_STATE_DIR") or Path.home() / ".vicuna-sky")


@dataclass
class FleetState:
    secret: str = ""
    controller_url: str = ""
    """The client URL the controller had (cloud: workers launched for another one are
    relaunched)."""
    tls: str = ""
    """The controller's fleet-port key and certificate (PEM): made once per fleet, so a
    relaunched controller shows the certificate its workers pin."""
    bucket: str = ""
    """Cloud fleets: the bucket its sealed certificate is kept in (removed with the fleet)."""
    ports: dict[str, int] = field(default_factory=dict)
    """Local fleets: the controller's, the fleet port's and the UI's, kept by a relaunch."""

    @staticmethod
    def path(name: str, root: Path | None = None) -> Path:
        return (root or state_dir()) / "fleets" / f"{name}.json"

    @classmethod
    def load(cls, name: str, root: Path | None = None) -> FleetState:
        try:
            raw = json.loads(cls.path(name, root).read_text())
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (OSError, ValueError, AttributeError, TypeError):
            return cls()

    def save(self, name: str, root: Path | None = None) -> None:
        path = self.path(name, root)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)

    def write_certificate(self, name: str, root: Path | None = None) -> Path:
        """The fleet's certificate, without its key, beside the state: what clients trust."""
        path = self.path(name, root).with_suffix(".crt")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(certificate_pem(self.certificate(name)[0]))
        return path

    def certificate(self, name: str) -> tuple[str, str]:
        """(PEM, fingerprint) of the fleet's controller certificate, made on first use."""
        if not self.tls:
            self.tls = make_certificate(f"{name} controller")
        return self.tls, fingerprint(self.tls)


def seal(pem: str, secret: str, name: str) -> bytes:
    """`pem` encrypted and authenticated with a key drawn from `secret`, bound to the fleet's
    `name` (a sealed object copied to another fleet's place does not open there)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return b"v1" + nonce + AESGCM(_key(secret)).encrypt(nonce, pem.encode(), name.encode())


def unseal(blob: bytes, secret: str, name: str) -> str:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if blob[:2] != b"v1" or len(blob) < 14:
        raise VicunaSkyError(f"fleet {name}: the sealed certificate in its bucket is not ours")
    try:
        return AESGCM(_key(secret)).decrypt(blob[2:14], blob[14:], name.encode()).decode()
    except InvalidTag:
        raise VicunaSkyError(
            f"fleet {name}: its certificate in the bucket was sealed with another fleet secret: "
            "export the secret this fleet was launched with (VICUNA_SKY_FLEET_SECRET)"
        ) from None


def _key(secret: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"vicuna-sky fleet tls")
    return hkdf.derive(secret.encode())


def fleet_prefix(bucket: str, name: str) -> str:
    return f"{bucket.rstrip('/')}/fleets/{name}"


def recover_certificate(bucket: str, name: str, secret: str) -> str:
    """The fleet's certificate and key from its bucket ('' when none was kept there)."""
    import tempfile

    from checkpoints_sync.factory import open_store

    store = open_store(fleet_prefix(bucket, name))
    if not store.exists(SEALED_KEY):
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        store.get_file(SEALED_KEY, Path(tmp) / "sealed")
        return unseal((Path(tmp) / "sealed").read_bytes(), secret, name)


def keep_certificate(bucket: str, name: str, secret: str, pem: str) -> None:
    """Seal the fleet's certificate and key into its bucket (each launch: the same content)."""
    import tempfile

    from checkpoints_sync.factory import open_store

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sealed"
        path.write_bytes(seal(pem, secret, name))
        open_store(fleet_prefix(bucket, name)).put_file(path, SEALED_KEY)


def forget_certificate(bucket: str, name: str) -> None:
    from checkpoints_sync.factory import open_store

    open_store(fleet_prefix(bucket, name)).delete([SEALED_KEY])
