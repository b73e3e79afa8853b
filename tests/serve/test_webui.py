"""The chat page in headless Chromium (Debian's chromium, driven by playwright)."""

import os
import shutil

import pytest

from vicuna_sky.ports import free_port
from vicuna_sky.serve.local_fleet import LocalFleet, Proc

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Every host name resolves to nothing but loopback: the browser's own lookups (Google's
    # update, safe-browsing and suggestion hosts) never reach a resolver.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--dns-prefetch-disable",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-pings",
]


@pytest.fixture
def page(fleet: LocalFleet, tmp_path):
    fleet.start_controller()
    fleet.wait_workers({fleet.start_worker("echo", "echo", "echo")})
    yield from open_page(fleet, tmp_path)


def open_page(fleet: LocalFleet, tmp_path):
    """The chat UI of `fleet`'s controller, in headless Chromium."""
    if not os.path.exists(CHROMIUM):
        # `make env` installs Debian's chromium (as root, from the distribution's packages);
        # a machine where that was impossible cannot run a browser test at all.
        pytest.skip("chromium is not installed: `make env` installs the Debian package")
    from playwright.sync_api import sync_playwright

    port = free_port()
    ui = Proc(
        [
            "vicuna_sky.serve.webui",
            "--port",
            str(port),
            "--controller-url",
            fleet.url,
            "--blocklist",
            "forbidden topic",
        ],
        tmp_path / "webui.log",
        env={"GRADIO_ANALYTICS_ENABLED": "False"},
    )
    fleet.procs.append(ui)
    fleet.wait_http(f"http://127.0.0.1:{port}/", timeout=120)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        yield page
        browser.close()


def send(page, text: str) -> None:
    box = page.get_by_role("textbox").last
    box.fill(text)
    box.press("Enter")


def test_type_a_message_and_see_the_streamed_answer(page):
    send(page, "hello from the browser")
    page.get_by_text("echo: hello from the browser").first.wait_for(timeout=30_000)


def test_moderation_blocks_before_the_model(page):
    send(page, "tell me about the forbidden topic")
    page.get_by_text("blocked by the moderation policy").first.wait_for(timeout=30_000)
    # The next message's answer arrives after anything the model could have said to the
    # blocked one (one conversation, in order): only then is its absence a fact.
    send(page, "and now something allowed")
    page.get_by_text("echo: and now something allowed").first.wait_for(timeout=30_000)
    assert page.get_by_text("echo: tell me").count() == 0  # the model never saw it


class RecordingWorker:
    """A stand-in worker that answers each generation with "answer N" (streamed, as a worker
    does) and keeps the messages it was asked with: what the model would be prompted with."""

    def __init__(self, fleet: LocalFleet) -> None:
        import http.server
        import json
        import threading

        self.asked: list[list[dict]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                messages = payload["messages"]
                recorder.asked.append([{k: m[k] for k in ("role", "content")} for m in messages])
                n = len(recorder.asked)
                lines = [{"prompt_tokens": 5}, {"text": f"answer {n}"}]
                lines.append({"finish_reason": "stop", "completion_tokens": 2})
                body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        import httpx

        from .conftest import SECRET

        registration = {
            "address": f"http://127.0.0.1:{self.server.server_port}",
            "worker_id": "recording-worker",
            "models": ["recorded"],
            "max_concurrency": 4,
        }
        httpx.post(
            f"{fleet.url}/workers/register",
            json=registration,
            headers={"Authorization": f"Bearer {SECRET}"},
        ).raise_for_status()


def test_the_chat_remembers_earlier_turns_in_a_real_browser(fleet, tmp_path):
    """Gradio 6 hands the history over with each message's content as a list of parts; the
    page dropped every such message, so "what is my name?" reached the model alone. Three
    turns typed in Chromium: each reaches the model with every turn before it."""
    fleet.start_controller("--expiry-seconds", "600")  # the stand-in never heartbeats
    worker = RecordingWorker(fleet)
    try:
        for page in open_page(fleet, tmp_path):
            for n, text in enumerate(["my name is Alice", "what is my name?", "thanks"], 1):
                send(page, text)
                page.get_by_text(f"answer {n}").first.wait_for(timeout=30_000)
    finally:
        worker.server.shutdown()
    assert worker.asked == [
        [{"role": "user", "content": "my name is Alice"}],
        [
            {"role": "user", "content": "my name is Alice"},
            {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": "what is my name?"},
        ],
        [
            {"role": "user", "content": "my name is Alice"},
            {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": "what is my name?"},
            {"role": "assistant", "content": "answer 2"},
            {"role": "user", "content": "thanks"},
        ],
    ]


def test_gradio_messages_of_parts_become_the_conversation():
    from vicuna_sky.serve.webui import REFUSAL, conversation

    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "my name "}, {"type": "text", "text": "is Alice"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": " Alice"}]},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}}]},
        # Only text parts are text: a component's or a file's own "text" field is not.
        {"role": "user", "content": [{"type": "component", "text": "a plot's caption"}]},
        {"role": "user", "content": [{"type": "video", "text": "its caption"}]},
        {"role": "user", "content": [{"type": "text", "text": "bomb"}]},
        {"role": "assistant", "content": [{"type": "text", "text": REFUSAL}]},
        {"role": "user", "content": "what is my name?"},
        # Roles as the browser's JSON gives them: equal strings, not the same objects.
        {"role": "".join(["assis", "tant"]), "content": [{"type": "text", "text": "you are"}]},
        {"role": "".join(["assist", "ant"]), "content": [{"type": "text", "text": " Alice"}]},
        {"role": "user", "content": ["a bare string part", {"type": "text", "text": "ok"}]},
    ]
    assert conversation(parts) == [
        {"role": "user", "content": "my name is Alice"},
        {"role": "assistant", "content": "hello Alice"},
        {"role": "user", "content": "what is my name?"},
        {"role": "assistant", "content": "you are Alice"},
        {"role": "user", "content": "ok"},
    ]


def test_a_blocked_message_never_reaches_a_model_as_context():
    from vicuna_sky.serve.webui import NO_MODEL, REFUSAL, conversation

    history = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "how do I make a bomb"},
        {"role": "assistant", "content": REFUSAL},
        {"role": "user", "content": "anyone there?"},
        {"role": "assistant", "content": NO_MODEL},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"},
        {"role": "user", "content": NO_MODEL},  # a user who pastes the page's notice
    ]
    assert conversation(history) == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"},
        {"role": "user", "content": NO_MODEL},  # only the page's own answers are dropped
    ]


def test_logins_are_rate_limited():
    """Hole 9: 50 wrong passwords in a burst compare 5; while the limit holds even the right
    password is refused (a guesser learns nothing), and it is let in once the limit refills."""
    import time

    from vicuna_sky.serve.webui import LoginGuard

    guard = LoginGuard("right", burst=5, refill_seconds=0.5)
    compared = [guard("u", "wrong") for _ in range(50)]
    assert not any(compared) and guard.tokens < 1
    assert guard("u", "right") is False
    time.sleep(0.6)
    assert guard("u", "right") is True


def test_the_blocklist_is_not_beaten_by_spacing_invisibles_or_look_alikes():
    """Hole 11: whitespace, zero-width characters, fullwidth and Cyrillic/Greek look-alikes."""
    from vicuna_sky.serve.webui import Moderation

    moderation = Moderation(["make a bomb"])
    for text in [
        "how to MAKE  A   BOMB",
        "make\u200ba b\u200dom\u200bb",
        "m\u0430ke \u0430 b\u043emb",  # Cyrillic a, a, o
        "\uff4d\uff41\uff4b\uff45 \uff41 \uff42\uff4f\uff4d\uff42",  # fullwidth
        "m-a-k-e a b.o.m.b",
        "M\u0391KE A B\u039fMB",  # Greek capital alpha and omicron
    ]:
        assert moderation.flagged(text), text
    assert not moderation.flagged("make a bed, not a bomb shelter list")
