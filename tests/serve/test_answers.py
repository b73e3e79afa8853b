"""A request owns its generations (serve/answers.py): one that fails, or whose client leaves at
any point (queued, before its first token, one of `n` or of a prompt list), leaves nothing
running on any worker; seeds for `n` choices stay in range; waiting for a slot is no failure."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from vicuna_sky.serve.answers import next_seed
from vicuna_sky.serve.protocol import SEED_RANGE

from .conftest import QUESTION, in_flight


def wait_until(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def worker_metric(worker: str, name: str) -> float:
    """A sample's sum over its labels in the worker's metrics (with the fleet secret)."""
    from prometheus_client.parser import text_string_to_metric_families

    from .conftest import SECRET

    text = httpx.get(f"{worker}/metrics", headers={"Authorization": f"Bearer {SECRET}"}).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def generations(worker: str) -> float:
    """Generations the worker has started."""
    return worker_metric(worker, "vllm:e2e_request_latency_seconds_count")


def tokens(workers: list[str]) -> float:
    """Tokens the workers have generated."""
    return sum(worker_metric(w, "vllm:generation_tokens_total") for w in workers)


def test_seeds_for_more_choices_wrap_within_the_range():
    low, high = SEED_RANGE
    assert next_seed(5, 1) == 6 and next_seed(-5, 3) == -2
    assert next_seed(high, 1) == low and next_seed(high - 1, 2) == low
    assert next_seed(low, 15) == low + 15


def test_choices_with_and_without_a_seed_streamed_or_not(fleet):
    """n=1 and n=2, seeded or not, whole or streamed: every choice is answered in full (the
    seed moves on only when there is one; a stream of several choices waits for each one's
    first piece); a request counts as running while it runs, and only for a served model."""
    fleet.start_controller()
    echo = fleet.start_worker("echo", "echo", "echo", "--echo-delay", "0.02")
    fleet.wait_workers({echo})
    client = fleet.client()
    for n in (1, 2):
        for seed in (None, 7):
            answer = client.chat.completions.create(
                model="echo", messages=QUESTION, n=n, seed=seed, max_tokens=8
            )
            assert [c.message.content for c in answer.choices] == ["echo: hello there"] * n
            texts = [""] * n
            stream = client.chat.completions.create(
                model="echo", messages=QUESTION, n=n, seed=seed, max_tokens=8, stream=True
            )
            for chunk in stream:
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
            assert texts == ["echo: hello there"] * n, (n, seed)
    slow = threading.Thread(
        target=client.chat.completions.create,
        kwargs={
            "model": "echo",
            "messages": QUESTION,
            "max_tokens": 60,
            "extra_body": {"ignore_eos": True},
        },
    )
    slow.start()
    assert wait_until(lambda: running(fleet) == {"echo": 1}, 5), running(fleet)
    slow.join()
    assert running(fleet) == {"echo": 0}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="made-up", messages=QUESTION, max_tokens=8)
    assert running(fleet) == {"echo": 0}


def running(fleet) -> dict[str, float]:
    """The controller's `vllm:num_requests_running`, by model."""
    from prometheus_client.parser import text_string_to_metric_families

    from .conftest import SECRET

    text = httpx.get(f"{fleet.url}/metrics", headers={"Authorization": f"Bearer {SECRET}"}).text
    return {
        s.labels["model_name"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:num_requests_running"
    }


def test_seeded_choices_each_take_the_next_seed(own_tiny_fleet):
    """Choice i of a seeded request is sampled as a request with seed + i would be (wrapping
    past the largest seed; seed 0 is a seed like any other), so the choices differ and each
    can be reproduced alone. The prompt is counted once in the usage, whatever n is."""
    client = own_tiny_fleet.client()
    low, high = SEED_RANGE
    ask = {"model": "tiny", "messages": QUESTION, "max_tokens": 12, "temperature": 1.0}
    for first, second in ((high, low), (0, 1)):
        both = client.chat.completions.create(n=2, seed=first, **ask)
        alone = [client.chat.completions.create(seed=s, **ask) for s in (first, second)]
        texts = [c.message.content for c in both.choices]
        assert texts == [a.choices[0].message.content for a in alone], first
        assert texts[0] != texts[1]
        assert both.usage.prompt_tokens == alone[0].usage.prompt_tokens > 0
        assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed = client.chat.completions.create(
        n=2, seed=0, stream=True, stream_options={"include_usage": True}, **ask
    )
    usage = [chunk.usage for chunk in streamed if chunk.usage is not None]
    assert usage[-1].prompt_tokens == alone[0].usage.prompt_tokens


def test_a_request_that_fails_fast_stops_its_other_generations(own_tiny_fleet):
    """A prompt list whose first prompt the worker refuses (a token id past the vocabulary) is a
    400 at once; the fifteen others used to decode to the end of the context for nobody. The
    largest seed with n=2 is a valid request, answered."""
    fleet = own_tiny_fleet
    workers = sorted(fleet.workers)
    client = fleet.client()
    long = {"max_tokens": 1000, "extra_body": {"ignore_eos": True}}
    for prompts in ([[10**8], *[[1, 2, 3]] * 15], [*[[1, 2, 3]] * 3, [10**8]]):
        # The refused prompt first, then last: the error is still its 400, not a sibling's
        # cancellation.
        before = tokens(workers)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=prompts, **long)
        assert wait_until(lambda: sum(map(in_flight, workers)) == 0, 10), "generations ran on"
        # Stopped, not finished: far fewer tokens than the others' 1,000 each.
        made = tokens(workers) - before
        assert made < 500 * (len(prompts) - 1), made
    answer = client.chat.completions.create(
        model="tiny", messages=QUESTION, n=2, seed=SEED_RANGE[1], max_tokens=4
    )
    assert len(answer.choices) == 2


def test_an_abandoned_queued_stream_never_runs_and_a_queue_is_no_failure(fleet):
    """Streams queued behind a busy worker and abandoned after 0.3 s all ran afterwards; and a
    stream waiting for a slot longer than --first-token-timeout got a 503, its healthy worker
    backed off. Now the first never run, the second is answered."""
    fleet.start_controller("--first-token-timeout", "1")
    echo = fleet.start_worker(
        "echo", "echo", "echo", "--max-concurrency", "1", "--echo-delay", "0.1"
    )
    fleet.wait_workers({echo})
    busy = {"model": "echo", "messages": QUESTION, "max_tokens": 25, "ignore_eos": True}

    def occupy() -> threading.Thread:
        """The worker's one slot, taken for 2.5 s."""
        t = threading.Thread(
            target=httpx.post, args=(f"{fleet.url}/v1/chat/completions",), kwargs={"json": busy}
        )
        t.start()
        assert wait_until(lambda: in_flight(echo) == 1, 5)
        return t

    holder = occupy()
    streamed = busy | {"stream": True}
    url = f"{fleet.url}/v1/chat/completions"
    for _ in range(5):  # each gone before its first token
        gone = httpx.stream("POST", url, json=streamed, timeout=0.3)
        with pytest.raises(httpx.ReadTimeout), gone:
            pass
    holder.join()
    time.sleep(1.0)
    assert generations(echo) == 1, "an abandoned stream ran"
    holder = occupy()
    events = []
    with httpx.stream("POST", f"{fleet.url}/v1/chat/completions", json=streamed) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    holder.join()
    assert events[-1] == "data: [DONE]"
    assert echo in fleet.available()
