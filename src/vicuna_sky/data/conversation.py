"""Conversation templates: how turns become the one string a model is trained on and prompted with.

Training, serving and eval all render through a `Template`, so the model sees at inference exactly
the format it was trained on. `render` also returns the character spans of the assistant's
answers (each with its end-of-turn marker): the tokenizer maps those spans to the tokens that
carry loss.

- `vicuna_v1.1`: FastChat's Vicuna v1.1 template (`SeparatorStyle.ADD_COLON_TWO`), character for
  character: `SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:`.
- `chat_template`: the tokenizer's own Jinja chat template (`apply_chat_template`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vicuna_sky.data.sharegpt import GPT, HUMAN, SYSTEM
from vicuna_sky.errors import VicunaSkyError

USER, ASSISTANT = "user", "assistant"
ROLE_OF = {HUMAN: USER, GPT: ASSISTANT, SYSTEM: SYSTEM}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The same format as a Jinja chat template, written into exported tokenizers so that
# transformers' apply_chat_template and vLLM's chat endpoint prompt the model as it was trained.
VICUNA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token + system + ' ' -}}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Message:
    role: str
    """`system`, `user` or `assistant` (OpenAI's names)."""
    content: str


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) character spans that carry loss: each answer and its end-of-turn marker."""
    has_bos: bool = False
    """The text already starts with the BOS token, so tokenizing must not add another."""


class Template(Protocol):
    name: str
    stop: tuple[str, ...]
    """Strings that end an answer when generating."""

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> Rendered: ...


def from_sharegpt(turns: Sequence[dict]) -> list[Message]:
    """ShareGPT turns (`from`: human/gpt/system) as messages."""
    return [Message(ROLE_OF[t["from"]], t["value"]) for t in turns]


def check_roles(messages: Sequence[Message]) -> None:
    """An optional leading system message, then user/assistant strictly alternating."""
    body = messages[1:] if messages and messages[0].role == SYSTEM else messages
    for i, m in enumerate(body):
        expected = (USER, ASSISTANT)[i % 2]
        if m.role != expected:
            raise VicunaSkyError(
                f"message {i + len(messages) - len(body)} is {m.role!r}, expected {expected!r}: "
                "roles must alternate user/assistant after an optional system message"
            )


@dataclass(frozen=True)
class VicunaTemplate:
    """FastChat's `vicuna_v1.1`: roles `USER`/`ASSISTANT`, sep " ", sep2 "</s>"."""

    name: str = "vicuna_v1.1"
    system: str = VICUNA_SYSTEM
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    @property
    def stop(self) -> tuple[str, ...]:
        return (self.sep2,)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> Rendered:
        check_roles(messages)
        system, body = self.system, list(messages)
        if body and body[0].role == SYSTEM:
            system, body = body[0].content, body[1:]
        text = system + self.sep
        spans = []
        for m in body:
            if m.role == USER:
                text += f"{self.roles[0]}: {m.content}{self.sep}"
            else:
                # The answer's span starts at the space after "ASSISTANT:", which tokenizers
                # fold into the answer's first token; it ends after the end-of-turn marker.
                head = f"{self.roles[1]}:"
                start = len(text) + len(head)
                text += f"{head} {m.content}{self.sep2}"
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += f"{self.roles[1]}:"
        return Rendered(text, spans)


@dataclass
class ChatTemplate:
    """The tokenizer's own chat template. Answer spans come from incremental rendering: the
    answer to message k is what rendering k+1 messages adds to k messages plus the
    generation prompt. Templates that do not render incrementally are refused loudly."""

    tokenizer: Any
    name: str = "chat_template"

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise VicunaSkyError("the tokenizer has no chat template; use --template vicuna_v1.1")

    @property
    def stop(self) -> tuple[str, ...]:
        eos = self.tokenizer.eos_token
        return (eos,) if eos else ()

    def _text(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> Rendered:
        check_roles(messages)
        text = self._text(messages, add_generation_prompt)
        spans = []
        for k, m in enumerate(messages):
            if m.role != ASSISTANT:
                continue
            before = self._text(messages[:k], add_generation_prompt=True)
            upto = self._text(messages[: k + 1], add_generation_prompt=False).rstrip()
            if not (upto.startswith(before) and text.startswith(upto)):
                raise VicunaSkyError(
                    f"the chat template does not render message {k} as an extension of the "
                    "messages before it, so its answer cannot be located; use vicuna_v1.1"
                )
            spans.append((len(before), len(upto)))
        bos = self.tokenizer.bos_token
        return Rendered(text, spans, has_bos=bool(bos) and text.startswith(bos))


TEMPLATES = ("vicuna_v1.1", "chat_template")


def get_template(name: str, tokenizer: Any = None) -> Template:
    """A template by name; `chat_template` needs the tokenizer that carries it."""
    if name == "vicuna_v1.1":
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        return VicunaTemplate(sep2=eos)
    if name == "chat_template":
        if tokenizer is None:
            raise VicunaSkyError("template chat_template needs a tokenizer")
        return ChatTemplate(tokenizer)
    raise VicunaSkyError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
