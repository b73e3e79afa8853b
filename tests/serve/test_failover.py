"""The controller's failover path (`Controller.generate`), against a real controller process on
loopback and stub workers that answer as a broken, draining or misplaced worker would: what the
client gets, which worker is asked, and which stays in rotation. Each test has models of its
own, so one controller serves them all."""

import http.server
import itertools
import json
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from .conftest import SECRET

Answer = Callable[[dict], tuple[int, bytes | list[bytes]]]
_models = itertools.count()


class Stub:
    """A worker at a real address: `answer(payload)` gives the status and the body (bytes: one
    JSON answer; a list: stream lines, written one by one, the connection closed after them)."""

    def __init__(self, answer: Answer) -> None:
        self.answer, self.payloads = answer, []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.payloads.append(payload)
                status, body = stub.answer(payload)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for chunk in [body] if isinstance(body, bytes) else body:
                    self.wfile.write(chunk)
                    self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


def error(status: int, message: str, **more: str) -> Answer:
    body = json.dumps({"error": {"message": message, **more}}).encode()
    return lambda payload: (status, body)


def raw(status: int, body: bytes) -> Answer:
    return lambda payload: (status, body)


def lines(*events: dict) -> Answer:
    return lambda payload: (200, [json.dumps(e).encode() + b"\n" for e in events])


def whole(text: str) -> Answer:
    answer = {"text": text, "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}
    return lambda payload: (200, json.dumps(answer).encode())


@pytest.fixture(scope="module")
def controller(module_fleet) -> Iterator:
    module_fleet.start_controller("--expiry-seconds", "600")  # stubs never heartbeat
    stubs: list[Stub] = []
    module_fleet.stubs = stubs
    yield module_fleet
    for stub in stubs:
        stub.server.shutdown()


def workers(fleet, *answers: Answer) -> tuple[str, list[Stub]]:
    """A new model served by one stub per answer, registered in this order (the first is
    picked first while loads are equal)."""
    model = f"m{next(_models)}"
    stubs = [Stub(a) for a in answers]
    fleet.stubs.extend(stubs)
    headers = {"Authorization": f"Bearer {SECRET}"}
    for n, stub in enumerate(stubs):
        body = {"address": stub.address, "worker_id": f"stub-{model}-{n}", "models": [model]}
        httpx.post(f"{fleet.url}/workers/register", json=body | {"max_concurrency": 4},
                   headers=headers).raise_for_status()  # fmt: skip
    fleet.wait_workers({s.address for s in stubs})
    return model, stubs


def heartbeat(fleet, model: str, stub: Stub, n: int) -> None:
    """What the stub's worker process would send: it is alive and healthy."""
    body = {"address": stub.address, "worker_id": f"stub-{model}-{n}", "healthy": True}
    r = httpx.post(f"{fleet.url}/workers/heartbeat", json=body,
                   headers={"Authorization": f"Bearer {SECRET}"})  # fmt: skip
    r.raise_for_status()


def ask(fleet, model: str, **params: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **params}
    return httpx.post(f"{fleet.url}/v1/chat/completions", json=body, timeout=30)


def ask_streamed(fleet, model: str, **params: object) -> list[dict]:
    """The stream's data events, [DONE] as the string "[DONE]"."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, **params}  # fmt: skip
    out = []
    with httpx.stream("POST", f"{fleet.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(events: list) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


def finish_reasons(events: list) -> list[str]:
    return [
        e["choices"][0]["finish_reason"]
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")
    ]


def hits(stubs: list[Stub]) -> list[int]:
    return [len(s.payloads) for s in stubs]


# -- before the answer begins ---------------------------------------------------------------
def test_a_500_is_retried_once_then_the_client_gets_a_502(controller):
    model, stubs = workers(
        controller, error(500, "out of memory"), error(500, "out of memory"), whole("unused")
    )
    r = ask(controller, model)
    assert r.status_code == 502
    assert r.json()["error"]["message"] == "workers failed: out of memory"
    assert r.json()["error"]["type"] == "server_error"
    assert hits(stubs) == [1, 1, 0]  # it fails wherever it goes: the third is not asked
    assert {s.address for s in stubs} <= controller.available()  # a 500 is no broken worker


def test_one_500_then_the_answer_of_another_worker(controller):
    model, stubs = workers(controller, error(500, "out of memory"), whole("fine"))
    r = ask(controller, model)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    assert hits(stubs) == [1, 1]


def test_a_504_is_a_server_error_not_a_drain(controller):
    """Only a 503 says "draining"; a 504 (a proxy in front of the worker timing out) is retried
    elsewhere like any 5xx, and the worker stays in rotation."""
    model, stubs = workers(controller, error(504, "gateway timeout"), whole("fine"))
    r = ask(controller, model)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    assert hits(stubs) == [1, 1]
    assert {s.address for s in stubs} <= controller.available()


def test_a_worker_failing_again_before_it_answers_stays_out_past_its_heartbeat(controller):
    """The first failure is forgiven at the next heartbeat; a second in a row is not (the
    registry's back-off): only an answer starts the count over."""
    model, stubs = workers(controller, raw(404, b"Not Found"), whole("other"))
    for _ in range(2):
        assert ask(controller, model).json()["choices"][0]["message"]["content"] == "other"
        assert stubs[0].address not in controller.available()
        heartbeat(controller, model, stubs[0], 0)
    assert hits(stubs) == [2, 2]
    assert stubs[0].address not in controller.available()  # the second failure: 1 s out


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_starts_the_back_off_over(controller, stream):
    """Failed, answered, failed: the failure after an answer is a first one again, forgiven at
    the next heartbeat (whole answers and streams alike)."""
    turns = iter([raw(404, b""), whole("ok") if not stream else lines(
        {"text": "ok"}, {"finish_reason": "stop", "completion_tokens": 1}
    ), raw(404, b"")])  # fmt: skip
    model, stubs = workers(controller, lambda payload: next(turns)(payload), whole("other"))
    for _ in range(3):
        if stream:
            ask_streamed(controller, model)
        else:
            ask(controller, model).raise_for_status()
        heartbeat(controller, model, stubs[0], 0)
    assert hits(stubs)[0] == 3
    assert stubs[0].address in controller.available()


def test_a_client_error_is_passed_on_and_not_retried(controller):
    model, stubs = workers(
        controller,
        error(400, "max_tokens is too large", type="invalid_request_error", code="too_long"),
        whole("unused"),
    )
    r = ask(controller, model)
    assert r.status_code == 400
    assert r.json()["error"] | {"param": None} == {
        "message": "max_tokens is too large",
        "type": "invalid_request_error",
        "code": "too_long",
        "param": None,
    }
    assert hits(stubs) == [1, 0]
    assert stubs[0].address in controller.available()  # the client's mistake, not the worker's


def test_a_client_error_without_a_body_is_still_the_clients(controller):
    model, stubs = workers(controller, raw(413, b""), whole("unused"))
    r = ask(controller, model)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == "worker error"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert hits(stubs) == [1, 0]


def test_an_error_body_that_is_not_json(controller):
    model, stubs = workers(controller, raw(500, b"<html>oops"), raw(502, b"[1, 2]"))
    r = ask(controller, model)
    assert r.status_code == 502
    assert r.json()["error"]["message"] == "workers failed: worker answered HTTP 502"
    assert hits(stubs) == [1, 1]
    model, stubs = workers(controller, raw(400, b"not json"))
    r = ask(controller, model)
    assert r.status_code == 400 and r.json()["error"]["message"] == "worker answered HTTP 400"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_an_address_that_is_no_worker_is_taken_out_of_rotation(controller):
    """A 404 or a 403 (another service, or a worker of another fleet at that address): the
    request goes to the next worker, and the address gets no more requests."""
    model, stubs = workers(controller, raw(404, b"Not Found"), error(403, "no"), whole("here"))
    for _ in range(2):
        r = ask(controller, model)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "here"
    assert hits(stubs) == [1, 1, 2]
    assert controller.available() & {s.address for s in stubs} == {stubs[2].address}


def test_a_proxys_499_is_no_answer(controller):
    """nginx's 499 (its client, the hop, went away) from a proxy in front of a worker: not the
    client's error to pass on, but a worker that did not answer."""
    model, stubs = workers(controller, raw(499, b""), whole("here"))
    r = ask(controller, model)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "here"
    assert stubs[0].address not in controller.available()


def test_a_draining_worker_gets_no_new_work(controller):
    model, stubs = workers(controller, error(503, "draining"), whole("from the other"))
    for _ in range(2):
        r = ask(controller, model)
        assert r.json()["choices"][0]["message"]["content"] == "from the other"
    assert hits(stubs) == [1, 2]
    assert stubs[0].address not in controller.available()


def test_no_worker_left_is_a_503(controller):
    model, stubs = workers(controller, raw(404, b""))
    r = ask(controller, model)
    assert r.status_code == 503
    assert r.json()["error"]["message"] == f"no worker for {model!r} is available"
    assert r.json()["error"]["type"] == "server_error"
    assert hits(stubs) == [1]
    r = ask(controller, "no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_malformed_answer_is_a_broken_worker(controller):
    model, stubs = workers(controller, raw(200, b"not json"), lines(), whole("good"))
    r = ask(controller, model)
    assert r.json()["choices"][0]["message"]["content"] == "good"
    assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert hits(stubs) == [1, 1, 1]
    assert controller.available() & {s.address for s in stubs} == {stubs[2].address}


def test_the_worker_is_asked_for_the_whole_answer_at_once_unless_streamed(controller):
    model, stubs = workers(controller, whole("all of it"))
    ask(controller, model, max_tokens=5)
    assert stubs[0].payloads[0]["stream"] is False and stubs[0].payloads[0]["max_tokens"] == 5
    assert stubs[0].payloads[0]["prefix"] == ""


# -- once the answer has begun ---------------------------------------------------------------
def test_a_worker_dying_mid_answer_is_continued_by_another(controller):
    """The second worker is given the text sent so far and the rest of max_tokens; the client
    gets one answer, and usage counts both workers' tokens."""
    model, stubs = workers(
        controller,
        lines({"prompt_tokens": 7}, {"text": "Hel"}, {"text": "lo"}),  # then the line drops
        lines({"text": " world"}, {"finish_reason": "stop", "completion_tokens": 1}),
    )
    events = ask_streamed(controller, model, max_tokens=10)
    assert text_of(events) == "Hello world"
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    second = stubs[1].payloads[0]
    assert (second["prefix"], second["max_tokens"], second["stream"]) == ("Hello", 8, True)
    assert stubs[0].address not in controller.available()


def test_one_token_left_is_still_a_continuation(controller):
    model, stubs = workers(
        controller,
        lines({"text": "a"}, {"text": "b"}),
        lines({"text": "c"}, {"finish_reason": "length", "completion_tokens": 1}),
    )
    events = ask_streamed(controller, model, max_tokens=3)
    assert text_of(events) == "abc"
    assert (stubs[1].payloads[0]["prefix"], stubs[1].payloads[0]["max_tokens"]) == ("ab", 1)


def test_a_continuation_without_max_tokens_has_none(controller):
    model, stubs = workers(
        controller,
        lines({"text": "a"}),
        lines({"text": "b"}, {"finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 1}),
    )
    events = ask_streamed(controller, model)
    assert text_of(events) == "ab"
    assert events[-2]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert (stubs[1].payloads[0]["prefix"], stubs[1].payloads[0]["max_tokens"]) == ("a", None)


def test_an_answer_cut_at_max_tokens_needs_no_other_worker(controller):
    model, stubs = workers(
        controller,
        lines({"prompt_tokens": 4}, {"text": "a"}, {"text": "b"}),
        lines({"text": "unused"}),
    )
    events = ask_streamed(controller, model, max_tokens=2)
    assert text_of(events) == "ab"
    assert finish_reasons(events) == ["length"]
    assert events[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert hits(stubs) == [1, 0]


def test_a_stream_without_its_first_token_in_time_goes_to_another_worker(fleet):
    """--first-token-timeout counts from the worker's start on the request (its answer's head,
    sent once it has a slot): a worker that then sends no token for longer loses the request to
    another. Waiting for a slot before that is a queue, not a failure, however long; a whole
    answer may take longer too (the request timeout is its own)."""
    import time

    fleet.start_controller("--expiry-seconds", "600", "--first-token-timeout", "1")
    fleet.stubs = []

    def started_then_stuck(payload: dict) -> tuple[int, object]:
        def body():
            yield json.dumps({"prompt_tokens": 3}).encode() + b"\n"
            time.sleep(2.5)
            yield json.dumps({"text": "too late"}).encode() + b"\n"

        return 200, body()

    def queued(payload: dict) -> tuple[int, bytes | list[bytes]]:
        time.sleep(2.5)  # every slot busy: the answer's head comes with a slot
        if not payload["stream"]:
            return whole("queued, then whole")(payload)
        return lines({"text": "queued, then in time"}, {"finish_reason": "stop"})(payload)

    try:
        ok = lines({"text": "in time"}, {"finish_reason": "stop"})
        model, stubs = workers(fleet, started_then_stuck, ok)
        assert text_of(ask_streamed(fleet, model)) == "in time"
        assert hits(stubs) == [1, 1]
        model, stubs = workers(fleet, queued)
        assert text_of(ask_streamed(fleet, model)) == "queued, then in time"
        r = ask(fleet, model)
        assert r.json()["choices"][0]["message"]["content"] == "queued, then whole"
        assert stubs[0].address in fleet.available()  # a busy worker is no broken one
    finally:
        for stub in fleet.stubs:
            stub.server.shutdown()


def test_a_whole_answer_not_in_time_goes_to_another_worker_and_a_stream_may_queue(fleet):
    """--request-timeout bounds a non-streamed answer (a worker that sits on it loses it to
    another), not the queue before a stream's first token, which the stream waits out."""
    import time

    fleet.start_controller("--expiry-seconds", "600", "--request-timeout", "1")
    fleet.stubs = []

    def slow(payload: dict) -> tuple[int, bytes | list[bytes]]:
        time.sleep(2.5)
        if not payload["stream"]:
            return whole("too late")(payload)
        return lines({"text": "queued past the request timeout"}, {"finish_reason": "stop"})(
            payload
        )

    try:
        model, stubs = workers(fleet, slow, whole("in time"))
        r = ask(fleet, model)
        assert r.json()["choices"][0]["message"]["content"] == "in time"
        assert hits(stubs) == [1, 1]
        model, stubs = workers(fleet, slow)
        assert text_of(ask_streamed(fleet, model)) == "queued past the request timeout"
    finally:
        for stub in fleet.stubs:
            stub.server.shutdown()


def test_pieces_past_max_tokens_need_no_other_worker(controller):
    """A worker that sent more pieces than max_tokens (a backend counting otherwise), then
    dropped: nothing is left to continue, so no other worker is asked for a negative rest."""
    model, stubs = workers(
        controller, lines({"text": "a"}, {"text": "b"}, {"text": "c"}), lines({"text": "unused"})
    )
    events = ask_streamed(controller, model, max_tokens=2)
    assert text_of(events) == "abc"
    assert finish_reasons(events) == ["length"]
    assert hits(stubs) == [1, 0]


def test_a_worker_dying_mid_answer_with_no_other_ends_the_stream_with_an_error(controller):
    model, stubs = workers(controller, lines({"text": "Hel"}))
    events = ask_streamed(controller, model)
    assert text_of(events) == "Hel"
    assert events[-1]["error"]["message"] == (
        "the worker failed mid-answer and no other worker could continue it"
    )
    assert "[DONE]" not in events
    assert hits(stubs) == [1]


def test_an_error_after_the_answer_began_ends_the_stream_and_is_not_retried(controller):
    model, stubs = workers(
        controller, lines({"text": "Hel"}, {"error": {"message": "CUDA error"}}), whole("unused")
    )
    events = ask_streamed(controller, model)
    assert text_of(events) == "Hel"
    assert events[-1]["error"]["message"] == "CUDA error"
    assert events[-1]["error"]["type"] == "server_error"
    assert hits(stubs) == [1, 0]
    model, stubs = workers(controller, lines({"text": "Hel"}, {"error": "not an object"}))
    assert ask_streamed(controller, model)[-1]["error"]["message"] == "the generation failed"


def test_a_500_after_the_answer_began_on_another_worker_ends_the_stream(controller):
    """The first worker dies mid-answer; the two next answer 500: the client has text already,
    so the error comes in the stream, not as an HTTP status."""
    model, stubs = workers(
        controller,
        lines({"text": "Hel"}),
        error(500, "out of memory"),
        error(500, "out of memory"),
    )
    events = ask_streamed(controller, model)
    assert text_of(events) == "Hel"
    assert events[-1]["error"]["message"] == "workers failed: out of memory"
    assert hits(stubs) == [1, 1, 1]
    model, stubs = workers(controller, lines({"text": "Hel"}), error(400, "too long"))
    events = ask_streamed(controller, model)
    assert events[-1]["error"]["message"] == "too long"


def test_a_stream_reaches_the_client_as_it_is_written(controller):
    """The worker writes its second line only once the client has the first: a hop that waited
    for the whole answer would never pass it on."""
    client_has_first = threading.Event()

    def gated(payload: dict) -> tuple[int, Iterator[bytes]]:
        def body() -> Iterator[bytes]:
            yield b'{"text": "first"}\n'
            client_has_first.wait(20)
            yield b'{"text": " second"}\n{"finish_reason": "stop", "completion_tokens": 2}\n'

        return 200, body()

    model, _ = workers(controller, gated)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    texts = []
    with httpx.stream("POST", f"{controller.url}/v1/chat/completions", json=body, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                texts.append(delta.get("content") or "")
                client_has_first.set()
    assert "".join(texts) == "first second"


def test_a_final_line_without_a_count_is_counted_by_its_pieces(controller):
    """The usage a worker does not report is what the hop saw: one token a piece, the pieces
    carried from a worker that died included."""
    model, _ = workers(
        controller,
        lines({"text": "Hel"}, {"text": "lo"}),
        lines({"text": " wor"}, {"text": "ld"}, {"text": "!"}, {"finish_reason": "stop"}),
    )
    events = ask_streamed(controller, model)
    assert text_of(events) == "Hello world!"
    assert events[-2]["usage"]["completion_tokens"] == 5
    model, _ = workers(controller, lines({"text": "a"}, {"finish_reason": "stop"}))
    assert ask_streamed(controller, model)[-2]["usage"]["completion_tokens"] == 1


def test_blank_lines_in_a_stream_are_skipped(controller):
    model, stubs = workers(
        controller,
        lambda p: (200, [b"\n", b'{"text": "ok"}\n', b"  \n", b'{"finish_reason": "stop"}\n']),
    )
    events = ask_streamed(controller, model)
    assert text_of(events) == "ok" and events[-1] == "[DONE]"
    assert hits(stubs) == [1]
