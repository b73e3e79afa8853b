"""Wire models: the OpenAI requests the controller accepts, and the controller <-> worker calls.

Errors everywhere have OpenAI's shape `{"error": {"message", "type", "code"}}` (`ApiError`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

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


def check_choices(choices: list[str] | None) -> list[str] | None:
    """guided_choice: 1 to MAX_GUIDED_CHOICES distinct, non-empty strings."""
    if choices is None:
        return None
    if not 1 <= len(choices) <= MAX_GUIDED_CHOICES:
        raise ValueError(f"must list 1 to {MAX_GUIDED_CHOICES} strings, got {len(choices)}")
    if any(not c for c in choices) or len(set(choices)) != len(choices):
        raise ValueError("must list distinct, non-empty strings")
    return choices


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(BaseModel):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None
    guided_choice: list[str] | None = None
    """vLLM's extension: the answer is one of these strings (the most likely one)."""

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        return check_choices(value)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingParams):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingParams):
    model: str
    prompt: str


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str]


class GenerateRequest(BaseModel):
    """Controller -> worker: one generation. `prefix` is assistant text already sent to the
    client by a worker that died mid-stream: this worker continues after it."""

    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prefix: str = ""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = True
    """False: the worker answers with one JSON object (cheaper for non-streamed requests)."""
    guided_choice: list[str] | None = None
    """The answer is the most likely of these strings under the model (vLLM's extension)."""

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        return check_choices(value)


class Registration(BaseModel):
    address: str
    """Base URL the controller reaches the worker at."""
    models: list[str] = Field(min_length=1)
    max_concurrency: int = Field(ge=1)
    context_length: int = 0
    secret: str = ""
