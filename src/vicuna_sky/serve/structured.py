"""Structured output and tools, as the controller sees them: what shape an answer must take, and
how a finished answer becomes tool calls.

`response_format` (json_object / json_schema) and a tool choice that must call a tool (`required`,
or a named function) become one JSON schema the worker decodes under (constrained decoding, so
the answer parses every time). A call is the object `{"name": ..., "arguments": {...}}`; the
controller hands it back as OpenAI's `tool_calls`. With `tool_choice` `auto` the model answers
freely, and an answer that is exactly such a call of a known tool is taken as one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from vicuna_sky.serve.protocol import ChatCompletionRequest, NamedToolChoice, SamplingParams


@dataclass(frozen=True)
class AnswerShape:
    json_schema: dict | None = None
    """What the worker constrains the answer to (None: free text)."""
    tools: list[dict] | None = None
    """Tool definitions for the prompt (OpenAI's form, which chat templates take)."""
    calls: frozenset[str] = frozenset()
    """Tools whose calls are parsed out of the answer (empty: the answer is content)."""
    must_call: bool = False
    """The answer is a call for sure (its text is never shown as content)."""


def answer_shape(req: SamplingParams) -> AnswerShape:
    schema = req.answer_schema()
    if not isinstance(req, ChatCompletionRequest) or not req.tools:
        return AnswerShape(json_schema=schema)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    choice = req.tool_choice or "auto"
    if choice == "none":
        return AnswerShape(json_schema=schema, tools=tools)
    names = [t.function.name for t in req.tools]
    if isinstance(choice, NamedToolChoice):
        names = [choice.function.name]
    elif choice == "auto":
        return AnswerShape(json_schema=schema, tools=tools, calls=frozenset(names))
    specs = {t.function.name: t.function.parameters for t in req.tools}
    calls = [_call_schema(name, specs[name]) for name in names]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return AnswerShape(json_schema=call, tools=tools, calls=frozenset(names), must_call=True)


def _call_schema(name: str, parameters: dict) -> dict:
    # A call's arguments are the declared ones: a function takes no others, and a model free to
    # invent keys (a small one above all) may never close the object.
    arguments = {"type": "object", "additionalProperties": False, **(parameters or {})}
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_calls(shape: AnswerShape, text: str) -> list[dict] | None:
    """OpenAI's `tool_calls` for an answer that is a call of one of `shape.calls`, else None."""
    if not shape.calls:
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if (
        not isinstance(call, dict)
        or call.get("name") not in shape.calls
        or not isinstance(call.get("arguments"), dict)
    ):
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
    ]
