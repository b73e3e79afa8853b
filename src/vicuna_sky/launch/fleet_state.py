"""What a re-run of `serve --fleet` must know about the fleet it repairs: its secret, its
controller's TLS certificate (the one the workers pin), and where the controller was.

Kept in a 0600 file, never in a task's envs: under ~/.vicuna-sky for cloud fleets (the
launcher's state), under the runs directory for local ones (with the ports the workers use).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vicuna_sky.serve.tls import certificate_pem, fingerprint, make_certificate


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
