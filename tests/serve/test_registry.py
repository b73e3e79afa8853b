"""The controller's worker registry: an address belongs to the worker process that registered it."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vicuna_sky.serve.protocol import Registration
from vicuna_sky.serve.registry import Registry

from .conftest import SECRET

ADDRESS = "http://127.0.0.1:9"


def registration(
    worker_id: str = "owner-0001", address: str = ADDRESS, models=("m",), concurrency=2, context=0
) -> Registration:
    return Registration(
        address=address,
        worker_id=worker_id,
        models=list(models),
        max_concurrency=concurrency,
        context_length=context,
    )


def expire(registry: Registry, address: str, seconds: float) -> None:
    """Make the worker at `address` silent for `seconds` (no sleeping)."""
    registry.workers[address].last_seen -= seconds


def test_only_the_owner_heartbeats_for_an_address(monkeypatch):
    """Issue #30 row 3 (in process): a foreign `worker_id` neither refreshes a silent worker
    nor brings a failed one back."""
    from vicuna_sky.serve import registry as registry_module

    monkeypatch.setattr(registry_module, "BACKOFF_SECONDS", (0.05, 0.05))
    registry = Registry(None, expiry_seconds=0.5)
    assert registry.register(registration()) == "ok"
    assert registry.heartbeat(ADDRESS, "owner-0001")
    registry.mark(ADDRESS, failed=True)
    registry.mark(ADDRESS, failed=True)  # twice in a row: out for 0.05 s
    time.sleep(0.06)  # past its back-off: the next heartbeat of its owner brings it back
    assert not registry.heartbeat(ADDRESS, "intruder-01")
    assert registry.pick("m", set()) is None  # still failed
    # The owner's heartbeat clears it (its id parsed from JSON: equal, not the same object).
    assert registry.heartbeat(ADDRESS, "".join(["owner-", "0001"]))
    assert registry.pick("m", set()) is not None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # the owner is silent; an intruder is not
        assert not registry.heartbeat(ADDRESS, "intruder-01")
        time.sleep(0.05)
    assert not registry.alive(ADDRESS) and registry.pick("m", set()) is None
    assert not registry.heartbeat("http://127.0.0.1:10", "owner-0001")  # unknown address


def test_an_address_is_taken_while_its_owner_lives_and_the_registry_is_bounded():
    registry = Registry(None, expiry_seconds=3, max_workers=2)
    assert registry.register(registration()) == "ok"
    assert registry.register(registration("intruder-01")) == "taken"
    assert registry.register(registration("zz-intruder")) == "taken"  # ids only compared equal
    assert registry.register(registration(models=["m", "n"])) == "ok"  # the owner, again
    assert registry.workers[ADDRESS].models == ["m", "n"]
    assert registry.register(registration("other-0001", "http://127.0.0.1:10")) == "ok"
    assert registry.register(registration("third-0001", "http://127.0.0.1:11")) == "full"
    expire(registry, ADDRESS, 3.5)  # silent past expiry: anyone may take the address
    assert not registry.alive(ADDRESS)
    assert registry.register(registration("newcomer-1")) == "ok"
    assert registry.workers[ADDRESS].worker_id == "newcomer-1"
    registry.workers[ADDRESS].healthy = False  # alive means heartbeating and healthy
    assert not registry.alive(ADDRESS) and not registry.alive("http://127.0.0.1:99")


def test_the_least_loaded_worker_serving_the_model_is_picked_and_counted():
    registry = Registry(None, expiry_seconds=3)
    a, b = "http://127.0.0.1:20", "http://127.0.0.1:21"
    registry.register(registration("worker-a01", a, models=["m"], concurrency=4))
    registry.register(registration("worker-b01", b, models=["m", "n"], concurrency=2))
    picks = [registry.pick("m", set()).address for _ in range(6)]
    # By load over capacity, then by requests in flight (a: 4 slots, b: 2; the first of equals).
    assert picks == [a, b, a, b, a, a]
    assert registry.workers[a].in_flight == 4 and registry.workers[b].in_flight == 2
    assert registry.pick("n", set()).address == b and registry.pick("n", {b}) is None
    assert registry.pick("m", {a}).address == b and registry.pick("x", set()) is None
    registry.release(registry.workers[a])
    assert registry.workers[a].in_flight == 3  # one request ends: one fewer
    for _ in range(5):
        registry.release(registry.workers[a])
    assert registry.workers[a].in_flight == 0  # never below zero
    registry.mark(b, draining=True)
    assert registry.pick("n", set()) is None and registry.pick("m", set()).address == a


def test_mark_takes_a_worker_out_only_for_its_owner():
    registry = Registry(None)
    registry.register(registration())
    assert not registry.mark(ADDRESS, draining=True, worker_id="intruder-01")
    assert not registry.mark(ADDRESS, draining=True, worker_id="zz-intruder")
    assert not registry.mark("http://127.0.0.1:99", failed=True)
    assert registry.mark(ADDRESS) and registry.pick("m", set()) is not None  # marks nothing
    assert registry.mark(ADDRESS, draining=True, worker_id="".join(["owner-", "0001"]))
    assert registry.workers[ADDRESS].draining and not registry.workers[ADDRESS].failed
    assert registry.mark(ADDRESS, failed=True)
    assert registry.mark(ADDRESS)  # a later plain mark clears neither
    assert registry.workers[ADDRESS].failed and registry.workers[ADDRESS].draining


def test_models_and_snapshot_show_the_workers_in_rotation():
    registry = Registry(None, expiry_seconds=3)
    a, b, c = "http://127.0.0.1:30", "http://127.0.0.1:31", "http://127.0.0.1:32"
    registry.register(registration("worker-a01", a, models=["m"], context=2048))
    registry.register(registration("worker-b01", b, models=["m", "n"], context=4096))
    registry.register(registration("worker-c01", c, models=["o"], context=8192))
    registry.mark(c, failed=True)
    assert registry.models() == {"m": 4096, "n": 4096}
    registry.register(registration("worker-d01", "http://127.0.0.1:33", models=["p"]))
    assert registry.models()["p"] == 0  # a worker that does not say its context length
    snapshot = {w["address"]: w for w in registry.snapshot()}
    assert [snapshot[x]["available"] for x in (a, b, c)] == [True, True, False]
    assert snapshot[b]["models"] == ["m", "n"] and snapshot[c]["failed"]
    assert snapshot[a]["worker_id"] == "worker-a01" and snapshot[a]["in_flight"] == 0


def test_expiry_and_forgetting_count_whole_seconds_of_silence(monkeypatch):
    """Silent exactly `expiry_seconds`: still in rotation; exactly `forget_seconds`: still
    known. A moment more, and it is out, then forgotten (the clock is the test's)."""
    from vicuna_sky.serve import registry as registry_module

    now = 1000.0
    monkeypatch.setattr(registry_module.time, "monotonic", lambda: now)
    registry = Registry(None, expiry_seconds=3, forget_seconds=60)
    registry.register(registration())
    registry.workers[ADDRESS].last_seen = 1000.0
    now = 1003.0
    assert registry.alive(ADDRESS) and registry.pick("m", set()) is not None
    now = 1003.5
    assert not registry.alive(ADDRESS) and registry.pick("m", set()) is None
    now = 1060.0
    assert registry.forget_expired() == [] and ADDRESS in registry.workers
    now = 1060.5
    assert registry.forget_expired() == [ADDRESS] and not registry.workers


def test_workers_are_persisted_and_the_long_silent_forgotten(tmp_path):
    db = tmp_path / "registry.db"
    registry = Registry(db, expiry_seconds=1, forget_seconds=10)
    a, b = "http://127.0.0.1:40", "http://127.0.0.1:41"
    registry.register(registration("worker-a01", a, context=1024))
    registry.register(registration("worker-b01", b))
    registry._db.execute("INSERT INTO workers VALUES ('http://x:1', '{\"old\": 1}')")
    registry._db.commit()
    restarted = Registry(db, expiry_seconds=1, forget_seconds=10)  # a controller restart
    assert set(restarted.workers) == {a, b}  # the unreadable row is skipped
    assert restarted.workers[a].context_length == 1024 and restarted.alive(a)
    expire(restarted, a, 5)
    assert restarted.forget_expired() == [] and not restarted.alive(a)  # expired, not forgotten
    expire(restarted, a, 6)
    assert restarted.forget_expired() == [a] and set(restarted.workers) == {b}
    assert set(Registry(db).workers) == {b}  # gone from the database too
    # The controller's threads share the registry: another thread may write the database.
    with ThreadPoolExecutor(1) as thread:
        assert thread.submit(restarted.register, registration("worker-a01", a)).result() == "ok"
    smaller = Registry(db, max_workers=1)  # restarted with fewer places than it has workers
    assert len(smaller.workers) == 2
    assert smaller.register(registration("worker-c01", "http://127.0.0.1:42")) == "full"
    assert smaller.register(registration("worker-a01", a)) == "ok"  # a known one re-registers
    assert Registry(None, expiry_seconds=20, forget_seconds=5).forget == 20  # never below expiry
    memory = Registry(None, expiry_seconds=1, forget_seconds=10)  # no database at all
    memory.register(registration("worker-a01", a))
    expire(memory, a, 11)
    assert memory.forget_expired() == [a] and memory.workers == {}


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


def test_a_worker_that_keeps_failing_stays_out_longer_each_time(monkeypatch):
    """Heartbeats do not bring a failed worker back before its back-off: none for a first
    failure, then 1 s, doubled for each failure in a row up to 30 s; an answer starts it over."""
    from vicuna_sky.serve import registry as registry_module

    registry = Registry(None, expiry_seconds=60)
    registry.register(registration())
    worker = registry.workers[ADDRESS]
    registry.mark(ADDRESS, failed=True)
    assert registry.pick("m", set()) is None  # out at once
    assert registry.heartbeat(ADDRESS, worker.worker_id)  # a first failure: back with it
    assert registry.pick("m", set()).address == ADDRESS
    registry.release(worker)  # that request failed too: no answer yet
    backoffs = []
    for _ in range(7):
        start = time.monotonic()
        registry.mark(ADDRESS, failed=True)
        backoffs.append(worker.failed_until - start)
        assert registry.heartbeat(ADDRESS, worker.worker_id)  # at once: still out
        assert worker.failed and registry.pick("m", set()) is None
    assert [round(b) for b in backoffs] == [1, 2, 4, 8, 16, 30, 30]
    registry.release(worker, answered=True)
    registry.mark(ADDRESS, failed=True)
    assert registry.heartbeat(ADDRESS, worker.worker_id)  # an answer started it over
    assert not worker.failed

    monkeypatch.setattr(registry_module, "BACKOFF_SECONDS", (0.05, 0.1))
    registry.mark(ADDRESS, failed=True)  # the second in a row: 0.05 s out
    assert registry.heartbeat(ADDRESS, worker.worker_id) and worker.failed
    time.sleep(0.06)
    assert registry.heartbeat(ADDRESS, worker.worker_id)
    assert not worker.failed and registry.pick("m", set()).address == ADDRESS
    registry.release(worker)  # no answer: the count goes on
    registry.mark(ADDRESS, failed=True)
    assert 0.09 < worker.failed_until - time.monotonic() <= 0.1  # the third: 0.1 s
    for _ in range(2000):  # a worker failing for days: the back-off stays a number
        registry.mark(ADDRESS, failed=True)
    assert 0.09 < worker.failed_until - time.monotonic() <= 0.1


FINGERPRINTS = ("a" * 64, "b" * 64)


def test_an_address_is_not_taken_over_with_another_certificate():
    """One `healthy: false` heartbeat (or a missed expiry) let any holder of the secret register
    the owner's address with its own certificate, locking the owner out. Another certificate
    now waits until the owner drained or was forgotten, or an admin forgets the address."""
    owner = registration().model_copy(update={"tls_fingerprint": FINGERPRINTS[0]})
    thief = registration("thief-00001").model_copy(update={"tls_fingerprint": FINGERPRINTS[1]})
    registry = Registry(None, expiry_seconds=3, forget_seconds=60)
    assert registry.register(owner) == "ok"
    assert registry.heartbeat(ADDRESS, "owner-0001", healthy=False)
    assert not registry.alive(ADDRESS)
    assert registry.register(thief) == "taken"
    expire(registry, ADDRESS, 59)  # silent, not forgotten
    assert registry.register(thief) == "taken"
    expire(registry, ADDRESS, 2)  # past forget_seconds: nobody's now
    assert registry.register(thief) == "ok"
    assert registry.workers[ADDRESS].worker_id == "thief-00001"
    # The owner's drain hands the address over at once.
    registry = Registry(None, expiry_seconds=3, forget_seconds=60)
    registry.register(owner)
    assert registry.mark(ADDRESS, draining=True, worker_id="owner-0001")
    assert registry.register(thief) == "ok"
    # An admin's word does too; with the same certificate, a silent owner's place is free.
    registry = Registry(None, expiry_seconds=3, forget_seconds=60)
    registry.register(owner)
    assert registry.forget_worker(ADDRESS) and not registry.forget_worker(ADDRESS)
    assert registry.register(thief) == "ok"
    same = registration("restarted-1").model_copy(update={"tls_fingerprint": FINGERPRINTS[1]})
    assert registry.register(same) == "taken"  # the owner lives
    expire(registry, ADDRESS, 3.5)
    assert registry.register(same) == "ok"


@pytest.mark.parametrize("owner, other", [FINGERPRINTS, FINGERPRINTS[::-1]])
def test_any_other_certificate_waits_whichever_it_is(owner, other):
    registry = Registry(None, expiry_seconds=3, forget_seconds=60)
    first = registration().model_copy(update={"tls_fingerprint": owner})
    assert registry.register(first) == "ok"
    expire(registry, ADDRESS, 10)  # silent past its expiry, not forgotten
    thief = registration("thief-00001").model_copy(update={"tls_fingerprint": other})
    assert registry.register(thief) == "taken"
    # The owner restarted (a new worker id, the same certificate): its place, once silent. The
    # fingerprint is an equal string, not the same object (as when parsed from a request).
    again = owner[:32] + owner[32:]
    restarted = registration("restarted-1").model_copy(update={"tls_fingerprint": again})
    assert registry.register(restarted) == "ok"


def test_an_address_has_one_spelling():
    """`LOCALHOST`, `127.1`, a trailing tab, `[::ffff:127.0.0.1]`, `:045999` registered as as
    many workers: each is written one way now, or refused."""
    from vicuna_sky.serve.protocol import check_worker_address as canonical

    for spelling, one in [
        ("http://LOCALHOST:8001", "http://localhost:8001"),
        ("HTTP://127.0.0.1:8001/", "http://127.0.0.1:8001"),
        ("http://[::ffff:127.0.0.1]:8001", "http://127.0.0.1:8001"),
        ("http://127.0.0.1:045999", "http://127.0.0.1:45999"),
        ("https://[0:0::1]:8001", "https://[::1]:8001"),
        ("https://Worker-1.example.COM.:8001", "https://worker-1.example.com:8001"),
        ("http://127.0.0.1:1", "http://127.0.0.1:1"),
        ("http://127.0.0.1:65535", "http://127.0.0.1:65535"),
    ]:
        assert canonical(spelling) == one, spelling
    for wrong in [
        "http://127.1:8001",
        "http://0x7f.0.0.1:8001",
        "http://127.0.0.1:8001\t",
        "http://127.0.0.1 :8001",
        "http://127.0.0.1:0",
        "http://127.0.0.1:8001/x",
        "http://user@127.0.0.1:8001",
        "http://wor_ker:8001",
        "ftp://127.0.0.1:8001",
        "http://127.0.0.1",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:8001?x",
        "http://127.0.0.1:8001#x",
    ]:
        # One message for every way of getting it wrong, none of them urllib's own.
        with pytest.raises(ValueError, match=r"must be http\(s\)://host:port|four decimal"):
            canonical(wrong)
    registry = Registry(None)
    assert registry.register(registration(address="http://LOCALHOST:8001")) == "ok"
    assert registry.register(registration("other-00001", "http://localhost:8001")) == "taken"
    assert list(registry.workers) == ["http://localhost:8001"]


def test_an_admin_forgets_an_address_and_heartbeats_name_it_any_way(fleet):
    fleet.start_controller("--expiry-seconds", "600")
    headers = {"Authorization": f"Bearer {SECRET}"}
    reg = registration(address="http://LOCALHOST:9").model_dump()
    assert httpx.post(f"{fleet.url}/workers/register", json=reg, headers=headers).json() == {
        "ok": True,
        "address": "http://localhost:9",
    }
    beat = {"address": "http://localhost:9/", "worker_id": "owner-0001"}
    assert httpx.post(f"{fleet.url}/workers/heartbeat", json=beat, headers=headers).is_success
    forget = {"address": "http://LocalHost:9"}
    r = httpx.post(f"{fleet.url}/admin/forget-worker", json=forget)
    assert r.status_code == 401
    r = httpx.post(f"{fleet.url}/admin/forget-worker", json=forget, headers=headers)
    assert r.json() == {"ok": True, "address": "http://localhost:9"}
    assert fleet.worker_states() == []
    r = httpx.post(f"{fleet.url}/admin/forget-worker", json=forget, headers=headers)
    assert r.status_code == 404
    # An address that is no address names no worker: 404 everywhere, never a server error.
    for route in ("/workers/heartbeat", "/workers/drain", "/admin/forget-worker"):
        nonsense = {"address": "not an address", "worker_id": "owner-0001"}
        r = httpx.post(f"{fleet.url}{route}", json=nonsense, headers=headers)
        assert r.status_code == 404, (route, r.text)
    assert httpx.get(f"{fleet.url}/health").status_code == 200


def test_a_model_is_served_while_a_registered_worker_names_it():
    """What metrics may be labelled with: names of registered workers, in rotation or not, and
    no longer once the last of them is forgotten or removed by an admin."""
    registry = Registry(None, expiry_seconds=3, forget_seconds=60)
    assert not registry.serves("m")
    registry.register(registration(models=("m", "alias")))
    registry.register(registration("other-0001", "http://127.0.0.1:9002", models=("n",)))
    assert registry.serves("m") and registry.serves("alias") and registry.serves("n")
    expire(registry, ADDRESS, 10)
    assert registry.serves("m")  # silent, out of rotation, still registered
    expire(registry, ADDRESS, 60)
    assert registry.forget_expired() == [ADDRESS]
    assert not registry.serves("m") and not registry.serves("alias") and registry.serves("n")
    assert registry.forget_worker("http://127.0.0.1:9002") and not registry.serves("n")
