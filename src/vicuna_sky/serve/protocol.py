"""Wire models: the OpenAI requests the controller accepts, and the controller <-> worker calls.

Errors everywhere have OpenAI's shape `{"error": {"message", "type", "code"}}` (`ApiError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

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
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "store": (None, False),
    # A model that does not reason has no effort to set (vLLM ignores it for such models too).
    "reasoning_effort": (None, "minimal", "low", "medium", "high"),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(BaseModel):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    """A string, or a list of text parts (what the openai client sends for structured content),
    joined into one string. None only on an assistant turn that calls tools."""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _developer(cls, value: str) -> str:
        """OpenAI's newer name for the system message of reasoning models."""
        return "system" if value == "developer" else value

    @field_validator("content")
    @classmethod
    def _join_parts(cls, value: str | list[dict] | None) -> str | None:
        if value is None or isinstance(value, str):
            return value
        texts = []
        for part in value:
            kind = part.get("type")
            if kind != "text":
                raise ValueError(f"a {kind!r} part: this model reads text parts only")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part needs its text as a string")
            texts.append(part["text"])
        return "".join(texts)

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None:
            if self.role != "assistant" or not self.tool_calls:
                raise ValueError("content may be null only on an assistant turn with tool_calls")
            self.content = ""
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant turn has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @property
    def tool_history(self) -> bool:
        """A turn of a tool conversation (a call or its result): only a template that knows
        tools can render it."""
        return self.role == "tool" or bool(self.tool_calls)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    """OpenAI's: one more chunk at the end, with the usage and no choices."""
    continuous_usage_stats: StrictBool = False
    """vLLM's: the usage so far on every chunk (guidellm counts tokens with it)."""


class FunctionSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _refs(cls, value: dict) -> dict:
        return check_refs(value)


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


def check_refs(schema: dict) -> dict:
    """A schema whose `$ref`s all point inside it (`#` or `#/json/pointer`) and never back into
    themselves: a recursive schema has no finite answer a decoder can be sure to reach (one that
    is only itself compiles to a grammar that ends at once, an empty answer)."""
    done: set[int] = set()
    path: set[int] = set()
    stack: list[tuple[object, bool]] = [(schema, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            path.discard(id(node))
            done.add(id(node))
            continue
        if id(node) in path:
            raise ValueError("a recursive schema ($ref back into itself) is not supported")
        if id(node) in done or not isinstance(node, dict | list):
            continue
        path.add(id(node))
        stack.append((node, True))
        children = list(node.values()) if isinstance(node, dict) else list(node)
        if isinstance(node, dict) and "$ref" in node:
            children.append(_pointed_at(schema, node["$ref"]))
        stack.extend((child, False) for child in children)
    return schema


def _pointed_at(schema: dict, ref: object) -> object:
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise ValueError(f"$ref {str(ref)[:80]!r}: only references within the schema (#/...)")
    node: object = schema
    for part in ref[2:].split("/") if ref != "#" else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise ValueError(f"$ref {ref[:80]!r} points at nothing in the schema")
    return node


class JsonSchemaFormat(BaseModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _refs(cls, value: dict) -> dict:
        return check_refs(value)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type 'json_schema'")
        return self


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    # Strict integers: JSON's true is not a count of 1.
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    """The newer name of max_tokens in OpenAI's API."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: StrictInt = Field(default=1, ge=1, le=16)
    """Answers per prompt, each generated on its own (streamed: one stream, chunks by index)."""
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    guided_choice: list[str] | None = None
    """vLLM's extension: the answer is one of these strings (the most likely one)."""
    ignore_eos: StrictBool = False
    """vLLM's extension: generate max_tokens tokens, past the end of the answer (load tests)."""
    response_format: ResponseFormat | None = None

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
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is for streamed requests (stream: true)")
        return self

    def answer_schema(self) -> dict | None:
        """The schema response_format asks the answer to follow (None: free text)."""
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.json_schema is None:  # json_object: any JSON object
            return {"type": "object"}
        return self.response_format.json_schema.schema_ or {"type": "object"}

    def answer_limit(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


MAX_MODEL_NAME = 200
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME)]
"""A served model's name, as a worker registers it: a client's is bounded alike."""


class ChatCompletionRequest(SamplingParams):
    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @model_validator(mode="after")
    def _roles(self) -> ChatCompletionRequest:
        """Every template takes an optional system message, then user/assistant alternating
        from a user turn: anything else is the client's mistake, answered before any worker
        sees it. A tool exchange (an assistant's calls and the tools' results) sits between a
        user turn and the assistant's answer, outside the alternation."""
        turns = [(i, m.role) for i, m in enumerate(self.messages) if not m.tool_history]
        body = turns[1:] if turns and turns[0][1] == "system" else turns
        for k, (at, role) in enumerate(body):
            expected = ("user", "assistant")[k % 2]
            if role != expected:
                raise ValueError(
                    f"messages[{at}] is {role!r}, expected {expected!r}: roles alternate "
                    "user/assistant after an optional system message"
                )
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, "
                                 "which is not in tools")  # fmt: skip
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        shaped = self.response_format is not None and self.response_format.type != "text"
        if shaped and self.tools and self.tool_choice != "none":
            raise ValueError("response_format and tools cannot both shape one answer")
        return self


Prompt = str | list[int]
"""One completion prompt: text, or token ids (what LangChain and vLLM's clients may send)."""


class CompletionRequest(SamplingParams):
    model: ModelName
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    """One prompt or a list of them: the answer has `n` choices per prompt, in order."""

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: object) -> object:
        prompts = cls.as_list(value)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"must be 1 to {MAX_PROMPTS} prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt: there is nothing to complete")
        if any(isinstance(p, list) and not all(0 <= t < 2**31 for t in p) for p in prompts):
            raise ValueError("token ids are non-negative integers")
        return value

    @staticmethod
    def as_list(value: object) -> list[Prompt]:
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(x, int) for x in value):  # one prompt of token ids
            return [list(value)]
        return list(value)

    def prompts(self) -> list[Prompt]:
        return self.as_list(self.prompt)


MAX_PROMPTS = 64
MAX_EMBED_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    """Text or token ids (LangChain's OpenAIEmbeddings sends token ids), one or a list."""
    encoding_format: Literal["float", "base64"] = "float"
    """base64: little-endian float32 values (what the openai client asks for by default)."""
    dimensions: StrictInt | None = Field(default=None, ge=1)
    """Honoured when it is the model's own size; no model here can shorten its vectors."""
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: object) -> object:
        inputs = CompletionRequest.as_list(value)
        if not 1 <= len(inputs) <= MAX_EMBED_INPUTS:
            raise ValueError(f"must be 1 to {MAX_EMBED_INPUTS} inputs")
        if any(len(x) == 0 for x in inputs):
            raise ValueError("an empty input: there is nothing to embed")
        if any(isinstance(p, list) and not all(0 <= t < 2**31 for t in p) for p in inputs):
            raise ValueError("token ids are non-negative integers")
        return value

    def inputs(self) -> list[Prompt]:
        return CompletionRequest.as_list(self.input)


class GenerateRequest(BaseModel):
    """Controller -> worker: one generation. `prefix` is assistant text already sent to the
    client by a worker that died mid-stream: this worker continues after it."""

    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | list[StrictInt] | None = None
    """Text, or token ids given as they are to the model."""
    prefix: str = ""
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    """None: up to the end of the model's context."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS + 8)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = True
    """False: the worker answers with one JSON object (cheaper for non-streamed requests)."""
    guided_choice: list[str] | None = None
    """The answer is the most likely of these strings under the model (vLLM's extension)."""
    json_schema: dict | None = None
    """The answer is JSON valid against this schema (constrained decoding)."""
    tools: list[dict] | None = None
    """Tool definitions, rendered into the prompt by a template that knows tools."""
    ignore_eos: bool = False

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
        if any(not 1 <= len(m) <= MAX_MODEL_NAME for m in value):
            raise ValueError(f"model names are 1 to {MAX_MODEL_NAME} characters")
        return value


def check_worker_address(address: str) -> str:
    """http(s)://host:port with nothing else (the controller appends its own paths), in its one
    canonical spelling: `LOCALHOST`, `127.1`, `[::ffff:127.0.0.1]`, a port written `:045999` or
    a trailing tab name an address some other way, and one worker's address must not be
    registered twice under other names (nor taken over by one)."""
    import ipaddress
    from urllib.parse import urlsplit

    wrong = ValueError("must be http(s)://host:port")
    if not address.isprintable() or any(c.isspace() for c in address):
        raise wrong
    try:
        url = urlsplit(address)
        port = url.port
    except ValueError:
        raise wrong from None
    if (
        url.scheme.lower() not in ("http", "https")
        or not url.hostname
        or port is None
        or not 0 < port < 65536
        or url.username is not None
        or url.password is not None
        or url.path.strip("/")
        or url.query
        or url.fragment
    ):
        raise wrong
    host = url.hostname.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not host or all(c in "0123456789." for c in host) or host.startswith("0x"):
            raise ValueError("an IPv4 address is four decimal numbers: a.b.c.d") from None
        if not all(c.isalnum() or c in "-." for c in host):
            raise wrong from None
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{url.scheme.lower()}://{host}:{port}"
