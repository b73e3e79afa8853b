"""Who may call the fleet's servers: keys compared whole, on every route that takes one."""

import httpx

from vicuna_sky.serve.auth import matches

from .conftest import SECRET

API_KEY = "client-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"


def strict_prefixes(secret: str) -> list[str]:
    # Not the empty one over HTTP: "Bearer " is no valid header value (it is in process).
    return [secret[:i] for i in (1, len(secret) // 2, len(secret) - 1)]


def test_matches_wants_the_whole_secret():
    """Issue #30 row 2 (in process): no prefix, extension or other key passes."""
    assert matches(API_KEY, [API_KEY]) and matches(API_KEY, [ADMIN_KEY, API_KEY])
    for given in ["", *strict_prefixes(API_KEY), API_KEY + "x", API_KEY.upper(), None]:
        assert not matches(given, [API_KEY]), given
        assert not matches(given, [ADMIN_KEY, API_KEY]), given
    assert not matches(API_KEY, [])


def test_a_strict_prefix_of_any_key_is_refused_on_every_route(fleet):
    """Issue #30 row 2: a client key, the fleet secret and an admin key, each cut short, on
    every route that takes it (the controller's and a worker's), is refused as a wrong key is."""
    fleet.start_controller(env={"VICUNA_SKY_API_KEYS": API_KEY, "VICUNA_SKY_ADMIN_KEYS": ADMIN_KEY})
    worker = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({worker})
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    registration = {"address": "http://127.0.0.1:9", "worker_id": "prefix-001", "models": ["m"],
                    "max_concurrency": 1}  # fmt: skip
    heartbeat = {"address": worker, "worker_id": "prefix-001"}
    c = fleet.url
    routes = {
        API_KEY: [
            ("GET", f"{c}/v1/models", None, 401),
            ("POST", f"{c}/v1/chat/completions", chat, 401),
            ("POST", f"{c}/v1/completions", {"model": "echo", "prompt": "hi"}, 401),
            ("POST", f"{c}/v1/embeddings", {"model": "echo", "input": "hi"}, 401),
        ],
        SECRET: [
            ("GET", f"{c}/workers", None, 401),
            ("GET", f"{c}/openapi.json", None, 401),
            ("POST", f"{c}/workers/register", registration, 403),
            ("POST", f"{c}/workers/heartbeat", heartbeat, 403),
            ("POST", f"{c}/workers/drain", heartbeat, 403),
            ("POST", f"{worker}/generate", {"model": "echo", "prompt": "hi"}, 403),
            ("POST", f"{worker}/embed", {"input": ["hi"]}, 403),
        ],
        ADMIN_KEY: [
            ("GET", f"{c}/workers", None, 401),
            ("GET", f"{c}/openapi.json", None, 401),
        ],
    }
    with httpx.Client(timeout=30) as http:

        def status(method: str, url: str, body: dict | None, key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return http.request(method, url, json=body, headers=headers).status_code

        for key, calls in routes.items():
            for method, url, body, refused in calls:
                for given in strict_prefixes(key):
                    assert status(method, url, body, given) == refused, (url, given)
            # The whole key passes where it is the one the route takes.
            method, url, body, _ = calls[0]
            assert status(method, url, body, key) == 200, (url, key)
    assert worker in fleet.available()  # nothing above reached the registry
