"""OpenAI answers from worker generations: chat and text completions, whole or streamed (SSE).

A request becomes one generation per choice: `n` per prompt, in order (a completion request may
carry several prompts, as LangChain's always does). A whole answer is gathered while the client
is still there; a client that goes away cancels every generation it started, so no worker slot
decodes for nobody. Tool calls and the usage are added here, as OpenAI shapes them.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse

from vicuna_sky.serve.cancel import took_back
from vicuna_sky.serve.protocol import SEED_RANGE, GenerateRequest, SamplingParams
from vicuna_sky.serve.structured import AnswerShape, tool_calls

if TYPE_CHECKING:
    from vicuna_sky.serve.hop import WorkerHop

T = TypeVar("T")

# Answer ids: unique per controller process without a uuid4 per request (os.urandom is a
# system call, measurable on the hop under load).
_ID_PREFIX = secrets.token_hex(6)
_ids = (f"{_ID_PREFIX}{n:012x}" for n in itertools.count())


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled as soon as the client disconnects (starlette does not cancel a handler
    whose client went away; only a streamed response notices). `work` runs in the caller's
    task, which a watcher cancels: one task per request, not two."""
    loop = asyncio.get_running_loop()  # once: each look-up is a getpid() on Python 3.11
    task = asyncio.current_task(loop)
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnect(request)
        gone = True
        task.cancel()

    watcher = loop.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and took_back(task):
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


async def _disconnect(request: Request) -> None:
    # The body has been read: the next message the server has for the app is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _choice(kind: str, index: int, text: str, finish: str | None, stream: bool) -> dict:
    if kind == "chat":
        key = "delta" if stream else "message"
        return {
            "index": index,
            key: {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def respond(
    controller: WorkerHop,
    request: Request,
    req: SamplingParams,
    gens: list[GenerateRequest],
    kind: str,
    shape: AnswerShape,
) -> object:
    """The answer to `req`: `gens` holds one generation per prompt, each run `req.n` times."""
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{next(_ids)}"
    head = {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": gens[0].model,
    }
    metrics, model = controller.metrics, gens[0].model
    started = time.monotonic()
    # n answers per prompt, each its own generation (a seed, if given, moves on by one for each).
    runs = [
        gen.model_copy(update={"seed": next_seed(gen.seed, i)}) if i and gen.seed is not None
        else gen
        for gen in gens
        for i in range(req.n)
    ]  # fmt: skip
    if req.stream:
        return await _streamed(controller, request, req, runs, kind, shape, head)

    async def collect(gen: GenerateRequest) -> tuple[str, dict]:
        text, final = "", {}
        async for event in controller.generate(gen):
            if "error" in event:
                raise event["error"]
            text += event.get("text", "")
            final = event if "finish_reason" in event else final
        return text, final

    running = metrics.running.labels(model) if controller.registry.serves(model) else None
    if running is not None:
        running.inc()
    try:
        work = all_or_none(list(map(collect, runs))) if len(runs) > 1 else _listed(collect(runs[0]))
        results = await unless_disconnected(request, work)
    finally:
        if running is not None:
            running.dec()
    choices = []
    for index, (text, final) in enumerate(results):
        finish = final.get("finish_reason", "stop")
        choice = _choice(kind, index, text, finish, stream=False)
        calls = tool_calls(shape, text) if kind == "chat" else None
        if calls:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
        choices.append(choice)
    # Each prompt counts once, however many choices it has.
    prompt = sum(final.get("prompt_tokens", 0) for _, final in results[:: req.n])
    completion = sum(final.get("completion_tokens", 0) for _, final in results)
    metrics.e2e.labels(model).observe(time.monotonic() - started)
    metrics.prompt_tokens.labels(model).inc(prompt)
    metrics.generation_tokens.labels(model).inc(completion)
    return head | {"choices": choices, "usage": _usage(prompt, completion)}


async def _streamed(
    controller: WorkerHop,
    request: Request,
    req: SamplingParams,
    runs: list[GenerateRequest],
    kind: str,
    shape: AnswerShape,
    head: dict,
) -> StreamingResponse:
    """One SSE stream for every run: choice i's chunks carry index i, in the order they come."""
    started = time.monotonic()
    streams = [controller.generate(run) for run in runs]
    # 4xx/5xx before anything is sent are plain HTTP errors. Until the first events are in
    # (queued behind busy workers, perhaps), the client may leave: then nothing runs on.
    try:
        if len(streams) == 1:
            firsts = [await unless_disconnected(request, anext(streams[0]))]
        else:
            opening = all_or_none([anext(events) for events in streams])
            firsts = await unless_disconnected(request, opening)
    except BaseException:
        for events in streams:
            await events.aclose()
        raise
    metrics, model = controller.metrics, runs[0].model
    options = req.stream_options
    every_chunk = bool(options and options.continuous_usage_stats)
    at_end = bool(options and options.include_usage)
    chunk_head = head | {"object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    # A call is given whole once it is complete: its text is JSON for the client, not content.
    held = kind == "chat" and shape.must_call
    prompts = [0] * len(runs)
    completions = [0] * len(runs)

    def usage() -> dict:
        # Each prompt counts once, however many choices it has.
        return _usage(sum(prompts[:: req.n]), sum(completions))

    def chunk(choices: list[dict], with_usage: bool = False) -> bytes:
        body = chunk_head | {"choices": choices}
        if with_usage:
            body["usage"] = usage()
        return b"data: " + orjson.dumps(body) + b"\n\n"

    async def sse() -> AsyncIterator[bytes]:
        metrics.running.labels(model).inc()
        try:
            async for piece in answer():
                yield piece
        finally:
            metrics.running.labels(model).dec()
            metrics.e2e.labels(model).observe(time.monotonic() - started)

    async def answer() -> AsyncIterator[bytes]:
        texts = [""] * len(runs)
        last: float | None = None
        done = 0
        async for index, event in _merged(firsts, streams):
            if "error" in event:
                # The answer broke off: the error is the stream's last word, with no [DONE]
                # after it, so no client takes the text so far for a whole answer.
                yield b"data: " + orjson.dumps(event["error"].body()) + b"\n\n"
                return
            prompts[index] = event.get("prompt_tokens", prompts[index])
            finish = event.get("finish_reason")
            delta = event.get("text", "")
            texts[index] += delta
            if delta:
                now = time.monotonic()
                if last is None:
                    metrics.ttft.labels(model).observe(now - started)
                else:
                    metrics.itl.labels(model).observe(now - last)
                last = now
            if finish:
                completions[index] = event.get("completion_tokens", completions[index])
                done += 1
            elif delta:
                completions[index] += 1  # about one delta per token; the final count corrects it
            if held and not finish:
                continue
            if finish and held and (calls := tool_calls(shape, texts[index])):
                delta_calls = [c | {"index": i} for i, c in enumerate(calls)]
                choice = {"index": index, "finish_reason": None,
                          "delta": {"role": "assistant", "tool_calls": delta_calls}}  # fmt: skip
                yield chunk([choice], every_chunk)
                finish, delta = "tool_calls", ""
            elif finish and held:
                delta = texts[index]
            # The usage rides on every chunk (continuous_usage_stats), or on the last choice's
            # last one unless a chunk of its own follows (include_usage).
            with_usage = every_chunk or (bool(finish) and done == len(runs) and not at_end)
            yield chunk([_choice(kind, index, delta, finish, stream=True)], with_usage)
        metrics.prompt_tokens.labels(model).inc(sum(prompts[:: req.n]))
        metrics.generation_tokens.labels(model).inc(sum(completions))
        if at_end:
            yield chunk([], with_usage=True)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")


async def _merged(
    firsts: list[dict], streams: list[AsyncIterator[dict]]
) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, event) from every stream, each in its own order, as they come; one stream
    is read in place. Every stream is closed when the reader stops."""
    if len(streams) == 1:
        try:
            yield 0, firsts[0]
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, dict | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        await queue.put((index, firsts[index]))
        async for event in streams[index]:
            await queue.put((index, event))
        await queue.put((index, None))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        running = len(pumps)
        while running:
            index, event = await queue.get()
            if event is None:
                running -= 1
                continue
            yield index, event
            if "error" in event:
                return
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for events in streams:
            await events.aclose()


async def _listed(work: Awaitable[T]) -> list[T]:
    return [await work]


async def all_or_none(work: list[Awaitable[T]]) -> list[T]:
    """Every result of `work`, run side by side; when one fails (or this is cancelled) the
    others are cancelled before the error goes on: a request that fails leaves nothing running
    for nobody (asyncio.gather would let them run to their end)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def next_seed(seed: int, step: int) -> int:
    """`seed` moved on by `step`, wrapping around within the seeds a request may give (a choice
    after 2**63 - 1 takes -2**63, not a seed the worker would refuse)."""
    low, high = SEED_RANGE
    return (seed - low + step) % (high - low + 1) + low
