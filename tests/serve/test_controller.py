"""The controller's failover path, against a real controller process on loopback."""

from .conftest import CannedWorker


def test_a_500_is_retried_on_another_worker_not_the_one_that_failed(fleet):
    """Issue #30 row 1: the failing worker is registered first, so it is picked first while
    loads are equal; the retry must go to the other one (and the failing one asked once)."""
    fleet.start_controller("--expiry-seconds", "60")  # the stub never heartbeats
    oom = b'{"error": {"message": "out of memory", "type": "server_error"}}'
    with CannedWorker(fleet, 500, oom, "failing-01") as failing:
        good = fleet.start_worker("echo", "echo", "echo")
        fleet.wait_workers({failing.address, good})
        client = fleet.client()
        for i in range(3):
            hits = failing.hits
            answer = client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": f"question {i}"}]
            )
            assert answer.choices[0].message.content == f"echo: question {i}"
            assert failing.hits - hits <= 1  # never asked twice for one request
    assert failing.hits >= 1  # it was tried: the failover was exercised
    # A 500 is not a broken worker: it stays in rotation (issue #19's rule).
    assert failing.address in fleet.available()
