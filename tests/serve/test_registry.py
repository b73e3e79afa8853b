"""The controller's worker registry: an address belongs to the worker process that registered it."""

import time

import httpx

from vicuna_sky.serve.protocol import Registration
from vicuna_sky.serve.registry import Registry

from .conftest import SECRET

ADDRESS = "http://127.0.0.1:9"


def registration(worker_id: str = "owner-0001") -> Registration:
    return Registration(address=ADDRESS, worker_id=worker_id, models=["m"], max_concurrency=2)


def test_only_the_owner_heartbeats_for_an_address():
    """Issue #30 row 3 (in process): a foreign `worker_id` neither refreshes a silent worker
    nor brings a failed one back."""
    registry = Registry(None, expiry_seconds=0.5)
    assert registry.register(registration()) == "ok"
    assert registry.heartbeat(ADDRESS, "owner-0001")
    registry.mark(ADDRESS, failed=True)
    assert not registry.heartbeat(ADDRESS, "intruder-01")
    assert registry.pick("m", set()) is None  # still failed
    assert registry.heartbeat(ADDRESS, "owner-0001")  # the owner's heartbeat clears it
    assert registry.pick("m", set()) is not None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # the owner is silent; an intruder is not
        assert not registry.heartbeat(ADDRESS, "intruder-01")
        time.sleep(0.05)
    assert not registry.alive(ADDRESS) and registry.pick("m", set()) is None
    assert not registry.heartbeat("http://127.0.0.1:10", "owner-0001")  # unknown address


def test_a_foreign_heartbeat_is_404_and_keeps_no_dead_worker_in_rotation(fleet):
    """Issue #30 row 3: the worker dies; heartbeats for its address with another worker_id are
    refused, and it leaves rotation when its own heartbeats stop."""
    fleet.start_controller("--expiry-seconds", "1", "--forget-seconds", "600")
    worker = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({worker})
    fleet.workers[worker].stop()
    secret = {"Authorization": f"Bearer {SECRET}"}
    statuses = set()
    deadline = time.monotonic() + 3  # three expiries
    while time.monotonic() < deadline:
        r = httpx.post(
            f"{fleet.url}/workers/heartbeat",
            json={"address": worker, "worker_id": "intruder-0001"},
            headers=secret,
        )
        statuses.add(r.status_code)
        time.sleep(0.1)
    assert statuses == {404}
    assert worker not in fleet.available()
    assert worker in {w["address"] for w in fleet.worker_states()}  # known, not in rotation
