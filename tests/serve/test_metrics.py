"""Prometheus metrics (vicuna_sky.serve.metrics) on a real controller and worker: vLLM's names for
what vLLM measures, behind the admin key or the fleet secret."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import SECRET

FLEET = {"Authorization": f"Bearer {SECRET}"}


def samples(url: str) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(f"{url}/metrics", headers=FLEET)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_controller_and_worker_metrics(fleet):
    fleet.start_controller()
    echo = fleet.start_worker("echo", "echo", "echo")
    fleet.wait_workers({echo})
    client = fleet.client()
    messages = [{"role": "user", "content": "one two three"}]
    client.chat.completions.create(model="echo", messages=messages)
    list(client.chat.completions.create(model="echo", messages=messages, stream=True))
    model = frozenset({("model_name", "echo")})
    got = samples(fleet.url)
    assert got[("vllm:e2e_request_latency_seconds_count", model)] == 2
    assert got[("vllm:time_to_first_token_seconds_count", model)] == 1  # the streamed one
    assert got[("vllm:generation_tokens_total", model)] >= 8
    assert got[("vllm:num_requests_running", model)] == 0
    by_worker = frozenset({("model_name", "echo"), ("worker", echo), ("status", "200")})
    assert got[("vicuna_sky:worker_requests_total", by_worker)] == 2
    assert got[("vicuna_sky:workers", frozenset({("state", "available")}))] == 1
    worker = samples(echo)
    assert worker[("vllm:e2e_request_latency_seconds_count", model)] == 2
    assert worker[("vllm:num_requests_waiting", model)] == 0
    assert httpx.get(f"{fleet.url}/metrics").status_code == 401
    assert httpx.get(f"{echo}/metrics").status_code == 403
