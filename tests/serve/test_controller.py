"""The controller's failover path, against a real controller process on loopback."""

import http.server
import threading

import httpx

from .conftest import SECRET


class _FailingWorker(http.server.BaseHTTPRequestHandler):
    """Answers every generation with a 500 (an OpenAI-shaped error) and counts them."""

    hits = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).hits += 1
        body = b'{"error": {"message": "out of memory", "type": "server_error"}}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_500_is_retried_on_another_worker_not_the_one_that_failed(fleet):
    """Issue #30 row 1: the failing worker is registered first, so it is picked first while
    loads are equal; the retry must go to the other one (and the failing one asked once)."""
    fleet.start_controller("--expiry-seconds", "60")  # the stub never heartbeats
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingWorker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    failing = f"http://127.0.0.1:{server.server_port}"
    body = {"address": failing, "worker_id": "failing-01", "models": ["echo"], "max_concurrency": 4}
    headers = {"Authorization": f"Bearer {SECRET}"}
    httpx.post(f"{fleet.url}/workers/register", json=body, headers=headers).raise_for_status()
    good = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({failing, good})
    client = fleet.client()
    try:
        for i in range(3):
            hits = _FailingWorker.hits
            answer = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": f"question {i}"}]
            )
            assert answer.choices[0].message.content == f"echo: question {i}"
            assert _FailingWorker.hits - hits <= 1  # never asked twice for one request
    finally:
        server.shutdown()
    assert _FailingWorker.hits >= 1  # it was tried: the failover was exercised
    # A 500 is not a broken worker: it stays in rotation (issue #19's rule).
    assert failing in fleet.available()
