"""Prometheus metrics for operators, on the controller and on each worker (`GET /metrics`, behind
the admin key or the fleet secret: they name models, workers and load).

Names follow vLLM's own (`vllm:...`, label `model_name`) where the meaning is the same, so the
dashboards people already have for vLLM read a fleet too; what vLLM has no name for (the fleet:
workers, failovers, drains, requests by worker) is `vicuna_sky:...`. Each server keeps its own
registry (not prometheus_client's global one): several apps in one process stay apart.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Labelled:
    """A metric's children, each looked up by prometheus_client once: its `labels()` checks the
    values and takes a lock on every call, six times on each request the controller answers."""

    def __init__(self, metric: Counter | Gauge | Histogram) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class ServingMetrics:
    """What both the controller and a worker measure about the answers they give."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.e2e = Labelled(Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, first byte in to last out.",
            ["model_name"], buckets=LATENCY_BUCKETS, registry=r,
        ))  # fmt: skip
        self.ttft = Labelled(Histogram(
            "vllm:time_to_first_token_seconds", "Time to the first token (streamed requests).",
            ["model_name"], buckets=sorted({*TOKEN_BUCKETS, *LATENCY_BUCKETS}), registry=r,
        ))  # fmt: skip
        self.itl = Labelled(Histogram(
            "vllm:inter_token_latency_seconds", "Time between two tokens (streamed requests).",
            ["model_name"], buckets=TOKEN_BUCKETS, registry=r,
        ))  # fmt: skip
        self.generation_tokens = Labelled(
            Counter("vllm:generation_tokens", "Tokens generated.", ["model_name"], registry=r)
        )
        self.prompt_tokens = Labelled(
            Counter("vllm:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r)
        )
        self.running = Labelled(
            Gauge(
                "vllm:num_requests_running", "Requests being answered.", ["model_name"], registry=r
            )
        )
        self.waiting = Labelled(
            Gauge(
                "vllm:num_requests_waiting",
                "Requests queued for a slot.",
                ["model_name"],
                registry=r,
            )
        )

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class FleetMetrics(ServingMetrics):
    """The controller's: requests by worker and outcome, failovers, drains, the workers."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Labelled(Counter(
            "vicuna_sky:worker_requests", "Requests sent to workers, by outcome (HTTP status, "
            "or `failed` for a broken worker).", ["model_name", "worker", "status"], registry=r,
        ))  # fmt: skip
        self.failovers = Labelled(
            Counter(
                "vicuna_sky:failovers",
                "Requests moved to another worker.",
                ["model_name"],
                registry=r,
            )
        )
        self.drains = Counter("vicuna_sky:drains", "Workers that said they drain.", registry=r)
        self.workers = Labelled(Gauge(
            "vicuna_sky:workers", "Workers by state (registered, available).", ["state"],
            registry=r,
        ))  # fmt: skip
