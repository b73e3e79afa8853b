"""The controller's failover path and its start, against a real controller process on
loopback."""

import sys

import pytest

from vicuna_sky.serve.local_fleet import LocalFleet

from .conftest import SECRET, CannedWorker


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


@pytest.mark.parametrize(
    "fleet_port, hard, said",
    [
        (True, 4096, "open files: 314 (raised from 100)"),
        (False, 4096, "open files: 290 (raised from 100)"),
        (True, 200, "warning: open files limited to 200 (raised from 100), under the 314 "),
    ],
)
def test_the_open_file_limit_is_raised_to_what_the_budgets_need(tmp_path, fleet_port, hard, said):
    """At start: each listener's --max-connections, one socket per worker (--max-workers) and
    256 more for the rest; raised that far, or as far as the hard limit lets it, and then said."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        f'#!/bin/sh\nulimit -Sn 100 && ulimit -Hn {hard} && exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    with LocalFleet(tmp_path / "fleet", SECRET, tls=fleet_port) as fleet:
        budgets = ("--max-connections", "24", "--max-workers", "10")
        fleet.start_controller(*budgets, python=str(wrapper))
        log = fleet.controller.log.read_text()
    assert said in log, log


class Held:
    """A connection as the budget sees it: vouched for or not."""

    def __init__(self) -> None:
        self.vouched_for = 0

    def vouched(self) -> None:
        self.vouched_for += 1


def calling(token: str, path: str, held: Held):
    from starlette.requests import Request

    from vicuna_sky.serve.connections import SCOPE_KEY

    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "https",
            "path": path,
            "query_string": b"",
            "headers": [(b"authorization", f"Bearer {token}".encode())],
            "client": ("198.18.0.11", 40000),
            "server": ("198.18.0.10", 8001),
            SCOPE_KEY: held,
        }
    )


def test_a_connection_that_shows_its_credential_is_kept_and_only_then():
    """What the fleet port's budget keeps when strangers flood it: the connection of a request
    that carried the fleet secret, an API key or an admin key, not one that carried a wrong one
    (nor, without keys, one that carried none)."""
    from vicuna_sky.serve.controller import Controller
    from vicuna_sky.serve.protocol import ApiError
    from vicuna_sky.serve.registry import Registry

    controller = Controller(Registry(None), SECRET, ["key-1"], ["admin-1"], require_tls=True)
    checks = [
        (controller.check_worker, "/workers/heartbeat", SECRET),
        (controller.check_key, "/v1/chat/completions", "key-1"),
        (controller.check_admin, "/workers", "admin-1"),
        (controller.check_admin, "/workers", SECRET),
    ]
    for check, path, token in checks:
        shown, wrong = Held(), Held()
        check(calling(token, path, shown))
        with pytest.raises(ApiError):
            check(calling("nobody", path, wrong))
        assert (shown.vouched_for, wrong.vouched_for) == (1, 0), (check, token)
    keyless = Controller(Registry(None), "", [], [])
    for check in (keyless.check_key, keyless.check_admin):
        anyone = Held()
        check(calling("", "/v1/models", anyone))
        assert anyone.vouched_for == 0
