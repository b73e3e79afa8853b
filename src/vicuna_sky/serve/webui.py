"""`python -m vicuna_sky.serve.webui`: a Gradio chat page on top of the controller's OpenAI API.

Reachable from other machines, it asks for a password and serves https (the operator's
certificate, VICUNA_SKY_CLIENT_TLS, else the fleet's); an https controller is trusted by its
certificate alone (the same one).

Model picker (from /v1/models), streamed answers, retry/undo/clear from Gradio's chat, and a
moderation hook applied to every user message before it reaches a model: a local blocklist by
default, or an OpenAI-compatible `/v1/moderations` endpoint when `--moderation-url` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from vicuna_sky.serve.auth import is_loopback, matches
from vicuna_sky.serve.tls import (
    CLIENT_TLS_ENV,
    FLEET_TLS_ENV,
    TlsError,
    certificate_pem,
    server_files,
)

REFUSAL = "This message was blocked by the moderation policy and was not sent to a model."


# Latin look-alikes from Cyrillic and Greek (the confusables a blocklist is beaten with).
HOMOGLYPHS = str.maketrans(
    {
        **dict(zip("аеорсухіјѕкмнтвԁԛԝ", "aeopcyxijskmhtbdqw", strict=True)),  # Cyrillic
        **dict(zip("οαεικνρτυχβ", "oaeikvptuxb", strict=True)),  # Greek
    }
)


def fold(text: str) -> str:
    """Text as the blocklist compares it: compatibility forms folded (NFKC: fullwidth and
    styled letters), invisible format characters (zero-width spaces and joiners) dropped,
    case folded, look-alike letters mapped to Latin, and everything but letters and digits
    removed, so "m a k e  a\u200b bomb" spacing and punctuation tricks meet the phrase."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf").casefold()
    return "".join(c for c in text.translate(HOMOGLYPHS) if c.isalnum())


@dataclass
class Moderation:
    blocklist: list[str] = field(default_factory=list)
    url: str = ""
    """OpenAI-compatible moderation endpoint base URL (…/v1); empty = blocklist only."""
    api_key: str = ""

    def flagged(self, text: str) -> bool:
        folded = fold(text)
        if any(fold(phrase) in folded for phrase in self.blocklist if fold(phrase)):
            return True
        if not self.url:
            return False
        r = httpx.post(
            f"{self.url.rstrip('/')}/moderations",
            json={"input": text},
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=10,
        )
        r.raise_for_status()
        return any(result.get("flagged") for result in r.json().get("results", []))


NO_MODEL = "No model is being served right now."


class LoginGuard:
    """The one password, with failed logins rate-limited: `burst` wrong passwords, then one more
    try every `refill_seconds`. Gradio tells the check nothing about who is trying, so the
    limit is for everyone: a guesser locks the page for a while, and learns nothing meanwhile
    (no password is compared while the limit holds)."""

    def __init__(self, password: str, burst: int = 5, refill_seconds: float = 10.0) -> None:
        self.password, self.burst, self.refill = password, burst, refill_seconds
        self.tokens, self.at = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, _user: str, given: str) -> bool:  # any user name, the one password
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) / self.refill)
            self.at = now
            if self.tokens < 1:
                return False
            if matches(given, [self.password]):
                return True
            self.tokens -= 1
            return False


def text_of(content: object) -> str | None:
    """A chat message's text: Gradio 6 hands the history over with each message's content as a
    list of parts (`{"type": "text", "text": ...}`, files, components), older versions as a
    string. None when it holds no text (a file alone)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = [
        p["text"]
        for p in parts
        if isinstance(p, dict)
        and p.get("type", "text") == "text"
        and isinstance(p.get("text"), str)
    ]
    return "".join(texts) if texts else None


def conversation(history: list[dict]) -> list[dict]:
    """The chat so far as the model should see it: a message the moderation blocked (and the
    page's own notices) never reaches a model, not even as context for the next turn."""
    out: list[dict] = []
    for m in history:
        text = text_of(m.get("content"))
        if text is None or m.get("role") not in ("user", "assistant", "system"):
            continue
        if m["role"] == "assistant" and text in (REFUSAL, NO_MODEL):
            if out and out[-1]["role"] == "user":
                out.pop()  # the question it answered goes with it
            continue
        if out and out[-1]["role"] == m["role"] == "assistant":
            out[-1]["content"] += text  # one answer Gradio shows in pieces
            continue
        out.append({"role": m["role"], "content": text})
    return out


def build(  # noqa: ANN201 (gr.Blocks)
    controller_url: str, api_key: str, moderation: Moderation, controller_pem: str = ""
):
    """The page; `controller_pem`: the certificate an https controller must show (pinned: the
    fleet's is self-signed)."""
    import gradio as gr
    from openai import OpenAI

    http_client = None
    if controller_pem:
        import httpx

        from vicuna_sky.serve.tls import trusting

        http_client = httpx.Client(verify=trusting(controller_pem), timeout=600)
    client = OpenAI(
        base_url=f"{controller_url.rstrip('/')}/v1",
        api_key=api_key or "none",
        http_client=http_client,
    )

    def models() -> list[str]:
        try:
            return [m.id for m in client.models.list().data]
        except Exception:
            return []

    def reply(message: str, history: list[dict], model: str) -> Iterator[str]:
        if moderation.flagged(message):
            yield REFUSAL
            return
        if not model:
            yield NO_MODEL
            return
        messages = conversation(history)
        messages.append({"role": "user", "content": message})
        text = ""
        for chunk in client.chat.completions.create(
            model=model, messages=messages, stream=True, max_tokens=512
        ):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            yield text

    available = models()
    with gr.Blocks(title="vicuna-sky chat") as demo:
        picker = gr.Dropdown(
            choices=available,
            value=available[0] if available else None,
            label="model",
            allow_custom_value=True,
        )
        gr.ChatInterface(reply, additional_inputs=[picker], title="vicuna-sky chat")
        demo.load(lambda: gr.Dropdown(choices=models()), outputs=picker)
    return demo


UI_API_KEY_ENV = "VICUNA_SKY_UI_API_KEY"
"""The key the chat UI presents to the controller."""
MODERATION_KEY_ENV = "VICUNA_SKY_MODERATION_API_KEY"
UI_PASSWORD_ENV = "VICUNA_SKY_UI_PASSWORD"
"""Required when the page is reachable from other machines (a login form before the chat)."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.serve.webui")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--controller-url", required=True)
    # Keys from the environment (SkyPilot secrets arrive there), never the command line.
    p.add_argument("--moderation-url", default="", help="OpenAI-compatible …/v1 base URL")
    p.add_argument(
        "--blocklist",
        nargs="*",
        default=["kill yourself", "make a bomb"],
        help="phrases refused before they reach a model",
    )
    args = p.parse_args(argv)
    password = os.environ.get(UI_PASSWORD_ENV, "")
    if not password and not is_loopback(args.host):
        print(
            f"error: the chat UI on {args.host} reaches a model from other machines: set "
            f"{UI_PASSWORD_ENV}",
            file=sys.stderr,
        )
        sys.exit(2)
    # The page's certificate and the controller's: the operator's (CLIENT_TLS), else the
    # fleet's, as the controller's client port chooses (serve/controller.py).
    pem = os.environ.get(CLIENT_TLS_ENV, "").strip() or os.environ.get(FLEET_TLS_ENV, "").strip()
    try:
        tls = server_files(pem) if pem and not is_loopback(args.host) else None
        if tls is None and not is_loopback(args.host):
            raise TlsError(
                f"the chat UI on {args.host} is reachable from other machines: give it a "
                f"certificate ({CLIENT_TLS_ENV} or {FLEET_TLS_ENV}) so its password and the "
                "conversations never cross the network in clear"
            )
        controller_pem = certificate_pem(pem) if args.controller_url.startswith("https:") else ""
    except TlsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    api_key = os.environ.get(UI_API_KEY_ENV, "")
    moderation_key = os.environ.get(MODERATION_KEY_ENV, "")
    moderation = Moderation(args.blocklist, args.moderation_url, moderation_key)
    demo = build(args.controller_url, api_key, moderation, controller_pem)

    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        show_error=True,
        auth=LoginGuard(password) if password else None,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
        # Gradio asks its own URL once at start: the fleet's certificate names no host.
        ssl_verify=tls is None,
    )


if __name__ == "__main__":
    main()
