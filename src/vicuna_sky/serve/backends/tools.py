"""Prompts with tools: the tool definitions and a conversation's tool calls and results.

Only a chat template written for tools knows where they go (Llama 3, Qwen, Hermes and SmolLM3
templates read a `tools` variable and render `tool_calls` and `tool` turns): such a template gets
them as transformers' `apply_chat_template` takes them. Any other template (vicuna_v1.1, a plain
ChatML one) cannot render a tool exchange, which is one clear 400; tool definitions alone are
described to it in the system message, so that the model at least reads what it may call.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vicuna_sky.serve.protocol import ApiError, ChatMessage, GenerateRequest

if TYPE_CHECKING:
    from vicuna_sky.data.conversation import Template


def uses_tools(request: GenerateRequest) -> bool:
    return bool(request.tools) or any(m.tool_history for m in request.messages or [])


def takes_tools(template: Template) -> bool:
    """A tokenizer chat template that reads the `tools` variable."""
    source = getattr(getattr(template, "tokenizer", None), "chat_template", None)
    return isinstance(source, str) and "tools" in source


def render_with_tools(template: Template, request: GenerateRequest) -> tuple[str, bool]:
    from vicuna_sky.data.conversation import Message

    messages = request.messages or []
    if takes_tools(template):
        tokenizer = template.tokenizer  # type: ignore[attr-defined]
        text = tokenizer.apply_chat_template(
            [_as_template_message(m) for m in messages],
            tools=request.tools or None,
            tokenize=False,
            add_generation_prompt=True,
        )
        bos = tokenizer.bos_token
        return text, bool(bos) and text.startswith(bos)
    if any(m.tool_history for m in messages):
        raise ApiError(
            400,
            f"this model's template ({template.name}) cannot render tool calls or tool results; "
            "serve it with --template chat_template and a chat template that takes tools",
            code="tools_not_supported",
        )
    described = _describe(request.tools or [])
    turns = [Message(m.role, m.content or "") for m in messages]
    if turns and turns[0].role == "system":
        turns[0] = Message("system", f"{turns[0].content}\n\n{described}")
    else:
        turns.insert(0, Message("system", described))
    rendered = template.render(turns, add_generation_prompt=True)
    return rendered.text, rendered.has_bos


def _as_template_message(m: ChatMessage) -> dict[str, Any]:
    """OpenAI's message as chat templates take it: a call's arguments as an object."""
    out: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def _arguments(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _describe(tools: list[dict]) -> str:
    return (
        "You may call one of these functions by answering with only a JSON object "
        '{"name": <function name>, "arguments": <its arguments>}:\n'
        + "\n".join(json.dumps(t.get("function", t)) for t in tools)
    )
