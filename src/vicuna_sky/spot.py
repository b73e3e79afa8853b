"""Preemption notices: SIGTERM, and the clouds' metadata endpoints.

A spot VM gets warned before it is taken: AWS answers `spot/instance-action` on its metadata
service about two minutes ahead, GCP flips `instance/preempted` to TRUE about 30 seconds ahead,
and the processes get SIGTERM. `PreemptionWatcher` turns all of these into one flag.

Endpoints are polled only on the cloud the job runs on (from SkyPilot's SKYPILOT_CLUSTER_INFO,
or `VICUNA_SKY_CLOUD`), and their URLs are configurable (`VICUNA_SKY_AWS_SPOT_URL`,
`VICUNA_SKY_AWS_TOKEN_URL`, `VICUNA_SKY_GCP_PREEMPTED_URL`) so tests and the chaos harness
point them at a server on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("vicuna_sky.spot")

PREEMPTED_EXIT_CODE = 75
"""Exit status of a process that stopped for a preemption after saving (EX_TEMPFAIL)."""

NOTICE_WINDOW_SECONDS = {"aws": 120.0, "gcp": 30.0, "sigterm": 30.0}
"""How long each kind of notice leaves before the machine goes (SIGTERM: torchrun's grace)."""


@dataclass(frozen=True)
class Endpoints:
    aws_token: str = "http://169.254.169.254/latest/api/token"
    aws_spot: str = "http://169.254.169.254/latest/meta-data/spot/instance-action"
    gcp_preempted: str = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"

    @classmethod
    def from_env(cls) -> Endpoints:
        default = cls()
        return cls(
            aws_token=os.environ.get("VICUNA_SKY_AWS_TOKEN_URL", default.aws_token),
            aws_spot=os.environ.get("VICUNA_SKY_AWS_SPOT_URL", default.aws_spot),
            gcp_preempted=os.environ.get("VICUNA_SKY_GCP_PREEMPTED_URL", default.gcp_preempted),
        )


def current_cloud() -> str:
    """'aws', 'gcp', or '' when the job does not run on a cloud with a notice endpoint."""
    explicit = os.environ.get("VICUNA_SKY_CLOUD")
    if explicit is not None:
        return explicit.lower()
    try:
        info = json.loads(os.environ.get("SKYPILOT_CLUSTER_INFO", "{}"))
    except json.JSONDecodeError:
        return ""
    cloud = str(info.get("cloud", "")).lower()
    return cloud if cloud in ("aws", "gcp") else ""


def _get(
    url: str, headers: dict[str, str], method: str = "GET", timeout: float = 2.0
) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def aws_notice(endpoints: Endpoints) -> bool:
    """IMDSv2: a session token, then spot/instance-action (404 until a notice exists)."""
    status, token = _get(
        endpoints.aws_token, {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, method="PUT"
    )
    headers = {"X-aws-ec2-metadata-token": token} if status == 200 else {}
    status, _ = _get(endpoints.aws_spot, headers)
    return status == 200


def gcp_notice(endpoints: Endpoints) -> bool:
    status, body = _get(endpoints.gcp_preempted, {"Metadata-Flavor": "Google"})
    return status == 200 and body.strip().upper() == "TRUE"


CHECKS = {"aws": aws_notice, "gcp": gcp_notice}


class PreemptionWatcher:
    """Sets `triggered` on SIGTERM or on a notice from the current cloud's endpoint."""

    def __init__(
        self,
        cloud: str | None = None,
        endpoints: Endpoints | None = None,
        poll_seconds: float = 5.0,
    ) -> None:
        self.cloud = current_cloud() if cloud is None else cloud
        self.endpoints = endpoints or Endpoints.from_env()
        # The chaos harness and tests poll faster than a real run needs to.
        self.poll_seconds = float(os.environ.get("VICUNA_SKY_NOTICE_POLL_SECONDS", poll_seconds))
        self.source = ""
        self.noticed_at = 0.0
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    @property
    def window_seconds(self) -> float:
        return NOTICE_WINDOW_SECONDS.get(self.source, 30.0)

    def trigger(self, source: str) -> None:
        if not self._event.is_set():
            self.source, self.noticed_at = source, time.monotonic()
            log.warning("preemption notice (%s): saving at the end of this step", source)
            self._event.set()

    def start(self) -> PreemptionWatcher:
        signal.signal(signal.SIGTERM, lambda *_: self.trigger("sigterm"))
        check = CHECKS.get(self.cloud)
        if check:
            self._thread = threading.Thread(
                target=self._poll, args=(check,), daemon=True, name="preemption-watcher"
            )
            self._thread.start()
        return self

    def check_once(self) -> bool:
        """Poll the current cloud's endpoint once (no thread); True on a notice."""
        check = CHECKS.get(self.cloud)
        if check is None:
            return False
        try:
            if check(self.endpoints):
                self.trigger(self.cloud)
        except (OSError, ValueError) as e:
            log.debug("notice poll failed: %s", e)
        return self.triggered

    def stop(self) -> None:
        self._stop.set()

    def _poll(self, check) -> None:  # noqa: ANN001 (one of CHECKS)
        while not self._stop.is_set() and not self._event.is_set():
            try:
                if check(self.endpoints):
                    self.trigger(self.cloud)
            except (OSError, ValueError) as e:  # the metadata server is not there: keep going
                log.debug("notice poll failed: %s", e)
            self._stop.wait(self.poll_seconds)
