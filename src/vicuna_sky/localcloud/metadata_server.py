"""A cloud metadata service on 127.0.0.1 that can announce a spot preemption.

It answers the two endpoints `vicuna_sky.spot` polls, the way the clouds do: AWS IMDSv2 (a token
from `PUT /latest/api/token`, then `GET /latest/meta-data/spot/instance-action`: 404 until a
notice, then 200 with the action and time) and GCP (`GET .../instance/preempted` with
`Metadata-Flavor: Google`: FALSE, then TRUE). The chaos harness and the tests point the trainer
at it through `env()`; nothing ever talks to a real metadata address.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

AWS_TOKEN = "/latest/api/token"
AWS_SPOT = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED = "/computeMetadata/v1/instance/preempted"


class MetadataServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.noticed_at: float | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, status: int, body: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                ok = self.path == AWS_TOKEN and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                )
                self._reply(200, b"local-token") if ok else self._reply(404)

            def do_GET(self) -> None:
                if self.path == AWS_SPOT:
                    if self.headers.get("X-aws-ec2-metadata-token") != "local-token":
                        return self._reply(401)
                    if server.noticed_at is None:
                        return self._reply(404)
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(server.noticed_at + 120))
                    return self._reply(
                        200, json.dumps({"action": "terminate", "time": when}).encode()
                    )
                if self.path == GCP_PREEMPTED:
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._reply(403)
                    return self._reply(200, b"TRUE" if server.noticed_at else b"FALSE")
                return self._reply(404)

            def log_message(self, *args: object) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.base = f"http://{host}:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> MetadataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def notice(self) -> None:
        """Announce the preemption (both clouds' endpoints flip)."""
        self.noticed_at = time.time()

    def clear(self) -> None:
        """A new machine: no notice pending."""
        self.noticed_at = None

    def env(self, cloud: str) -> dict[str, str]:
        """Environment for a trainer that should believe it runs on `cloud` (aws or gcp)."""
        return {
            "VICUNA_SKY_CLOUD": cloud,
            "VICUNA_SKY_AWS_TOKEN_URL": self.base + AWS_TOKEN,
            "VICUNA_SKY_AWS_SPOT_URL": self.base + AWS_SPOT,
            "VICUNA_SKY_GCP_PREEMPTED_URL": self.base + GCP_PREEMPTED,
        }
