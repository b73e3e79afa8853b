"""Wire models: the OpenAI requests the controller accepts, and the controller <-> worker calls.

Errors everywhere have OpenAI's shape `{"error": {"message", "type", "code"}}` (`ApiError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_GUIDED_CHOICES = 256


class ApiError(Exception):
    """An error a client should see as-is (4xx) or a worker/controller failure (5xx)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}
        }


def invalid_request(errors: Sequence[Any]) -> ApiError:
    """A request that failed validation, as one 400 naming the field (FastAPI's list of pydantic
    errors, the first of them)."""
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", [])[1:])
    what = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, f"{where}: {what}" if where else what)


def check_choices(choices: list[str] | None) -> list[str] | None:
    """guided_choice: 1 to MAX_GUIDED_CHOICES distinct, non-empty strings."""
    if choices is None:
        return None
    if not 1 <= len(choices) <= MAX_GUIDED_CHOICES:
        raise ValueError(f"must list 1 to {MAX_GUIDED_CHOICES} strings, got {len(choices)}")
    if any(not c for c in choices) or len(set(choices)) != len(choices):
        raise ValueError("must list distinct, non-empty strings")
    return choices


MAX_TOKENS_LIMIT = 2**31 - 1
"""Beyond any context: every count stays a machine integer (JSON encoders refuse more)."""
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_STOPS = 4
"""OpenAI's limit on stop strings."""

# OpenAI fields we accept and ignore when they ask for nothing (a client library may send them
# with their default values); any other value, or any other field, is a 400 naming the field
# instead of a silently different answer.
IGNORED_WHEN_DEFAULT: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False),
    "stream_options": (None, {}, {"include_usage": True}, {"include_usage": False}),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class TextPart(BaseModel):
    """A content part of a chat message; text is all a text model takes."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    """A string, or a list of text parts (what the openai client sends for structured content),
    joined into one string."""
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _join_parts(cls, value: str | list[TextPart]) -> str:
        return value if isinstance(value, str) else "".join(p.text for p in value)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    """The newer name of max_tokens in OpenAI's API."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=16)
    """Answers per request, each generated on its own (non-streamed requests)."""
    stream: bool = False
    user: str | None = None
    guided_choice: list[str] | None = None
    """vLLM's extension: the answer is one of these strings (the most likely one)."""

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        return check_choices(value)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"must be up to {MAX_STOPS} non-empty strings")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> SamplingParams:
        for name, value in (self.model_extra or {}).items():
            if name not in IGNORED_WHEN_DEFAULT:
                raise ValueError(f"unsupported field {name!r}")
            if value not in IGNORED_WHEN_DEFAULT[name]:
                raise ValueError(f"{name}={value!r} is not supported by this server")
        if self.n > 1 and self.stream:
            raise ValueError("n > 1 is supported without stream only")
        return self

    def answer_limit(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingParams):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _roles(self) -> ChatCompletionRequest:
        """Every template takes an optional system message, then user/assistant alternating
        from a user turn: anything else is the client's mistake, answered before any worker
        sees it."""
        roles = [m.role for m in self.messages]
        body = roles[1:] if roles[0] == "system" else roles
        for i, role in enumerate(body):
            expected = ("user", "assistant")[i % 2]
            if role != expected:
                at = i + len(roles) - len(body)
                raise ValueError(
                    f"messages[{at}] is {role!r}, expected {expected!r}: roles alternate "
                    "user/assistant after an optional system message"
                )
        return self


class CompletionRequest(SamplingParams):
    model: str
    prompt: str


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1, max_length=2048)
    encoding_format: Literal["float", "base64"] = "float"
    """base64: little-endian float32 values (what the openai client asks for by default)."""


class GenerateRequest(BaseModel):
    """Controller -> worker: one generation. `prefix` is assistant text already sent to the
    client by a worker that died mid-stream: this worker continues after it."""

    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prefix: str = ""
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS + 8)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = True
    """False: the worker answers with one JSON object (cheaper for non-streamed requests)."""
    guided_choice: list[str] | None = None
    """The answer is the most likely of these strings under the model (vLLM's extension)."""

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        return check_choices(value)


class Registration(BaseModel):
    address: str = Field(max_length=300)
    """Base URL the controller reaches the worker at: http(s)://host:port. A host of 0.0.0.0
    (or ::) means "the address this registration comes from"."""
    worker_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    """Random per worker process: an address in rotation belongs to the worker that registered
    it, and another process cannot take it over (or drain it) while it heartbeats."""
    models: list[str] = Field(min_length=1, max_length=16)
    max_concurrency: int = Field(ge=1, le=4096)
    context_length: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    tls_fingerprint: str = Field(default="", max_length=100)
    """SHA-256 of the certificate an https worker serves (serve/tls.py): the controller pins it
    on every request it sends there."""

    @field_validator("tls_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str) -> str:
        from vicuna_sky.serve.tls import parse_fingerprint

        return parse_fingerprint(value).hex() if value else ""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_worker_address(value)

    @field_validator("models")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        if any(not 1 <= len(m) <= 200 for m in value):
            raise ValueError("model names are 1 to 200 characters")
        return value


def check_worker_address(address: str) -> str:
    """http(s)://host:port with nothing else: the controller appends its own paths."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(address)
        port = url.port
    except ValueError:
        raise ValueError("must be http(s)://host:port") from None
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or port is None
        or url.username
        or url.password
        or url.path.strip("/")
        or url.query
        or url.fragment
    ):
        raise ValueError("must be http(s)://host:port")
    return address.rstrip("/")
