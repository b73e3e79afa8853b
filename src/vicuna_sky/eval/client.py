"""One client for every OpenAI-compatible chat endpoint the evaluation talks to: the model under
test (our controller, vLLM, a hosted API) and the judge. Transient failures are retried with
exponential backoff; anything else fails at once with the server's own message."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx

from vicuna_sky.errors import VicunaSkyError

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """The endpoint refused the request, or kept failing after every retry."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    """Up to and including the API version, e.g. http://127.0.0.1:8000/v1."""
    model: str
    api_key: str | None = None
    timeout: float = 600.0


class ChatClient:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
    ) -> None:
        _check_url(endpoint.base_url)
        self.endpoint, self.retries = endpoint, max(0, retries)
        self.backoff, self.max_backoff = backoff, max_backoff
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self.http = httpx.AsyncClient(
            base_url=endpoint.base_url.rstrip("/"),
            headers=headers,
            timeout=endpoint.timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.attempts = 0
        """Requests sent, retries included (tests and summaries read it)."""

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float,
        max_tokens: int,
        extra: dict | None = None,
    ) -> str:
        """The answer's text; `extra` adds request fields beyond OpenAI's (guided_choice)."""
        body = {
            "model": self.endpoint.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            **(extra or {}),
        }
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                response = await self.http.post("/chat/completions", json=body)
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}".rstrip(": ")
                wait = None
            else:
                if response.status_code == 200:
                    return _content(response)
                error = f"HTTP {response.status_code}: {_message(response)}"
                if response.status_code not in RETRYABLE_STATUS:
                    raise RequestFailed(error)
                wait = _retry_after(response)
            if attempt == self.retries:
                break
            delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.8, 1.2)
            await asyncio.sleep(wait if wait is not None else delay)
        raise RequestFailed(f"{error} (after {self.retries + 1} attempts)")


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise VicunaSkyError(f"not a URL: {url!r} ({e})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise VicunaSkyError(f"not an http(s) URL: {url!r} (e.g. http://127.0.0.1:8000/v1)")


def _content(response: httpx.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RequestFailed(f"not a chat completion: {response.text[:200]}") from None
    return content or ""


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(60.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None
