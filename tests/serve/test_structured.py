"""Structured output on the hf backend: constrained decoding (llguidance) makes every answer parse
against its schema, whatever the model; and tools in a chat template written for them."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from vicuna_sky.models import SMOLLM2, build

PROFILE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}

# A ChatML template that knows tools: the definitions in a system turn, a call as JSON in the
# assistant's turn, a result as a `tool` turn.
TOOLS_CHATML = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return build(SMOLLM2, tmp_path_factory.mktemp("models") / SMOLLM2)


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_twenty_schemad_objects_all_validate(fleet, tiny_chat_model, request, model):
    """Sampled at temperature 1 with 20 seeds: a random-weight model and a real small one. The
    worker's heartbeats may lag while four constrained generations share two loaded cores:
    what is tested is the answers, not failover (expiry 30 s, not 3)."""
    fleet.start_controller("--expiry-seconds", "30")
    if model == "tiny":
        worker = fleet.start_worker("hf", str(tiny_chat_model), model)
    else:
        path = str(request.getfixturevalue("smollm2"))
        worker = fleet.start_worker("hf", path, model, "--template", "chat_template")
    fleet.wait_workers({worker})
    client = fleet.client()
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": PROFILE}}
    messages = [{"role": "user", "content": "Make up a user profile as JSON."}]

    def ask(seed: int) -> object:
        return client.chat.completions.create(
            model=model,
            messages=messages,
            response_format=response_format,
            max_tokens=80,
            seed=seed,
        )

    with ThreadPoolExecutor(4) as pool:  # the worker's four slots
        answers = list(pool.map(ask, range(20)))
    for answer in answers:
        assert answer.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(answer.choices[0].message.content), PROFILE)


def test_tool_history_renders_through_a_template_that_takes_tools(fleet, tmp_path):
    from vicuna_sky.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tools-chatml", chat_template=TOOLS_CHATML)
    fleet.start_controller()
    worker = fleet.start_worker("hf", str(model), "tiny", "--template", "chat_template")
    fleet.wait_workers({worker})
    client = fleet.client()
    tool = {
        "type": "function",
        "function": {"name": "add", "parameters": {"type": "object", "properties": {}}},
    }
    question = [{"role": "user", "content": "add 2 and 3"}]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    history = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    short = client.chat.completions.create(model="tiny", messages=question, max_tokens=2)
    long = client.chat.completions.create(
        model="tiny", messages=history, tools=[tool], max_tokens=2
    )
    # The tools, the call and its result are all in the prompt the model saw.
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object"}}}


def shape_of(**request: object):
    from vicuna_sky.serve.protocol import ChatCompletionRequest
    from vicuna_sky.serve.structured import answer_shape

    messages = [{"role": "user", "content": "hi"}]
    return answer_shape(ChatCompletionRequest(model="m", messages=messages, **request))


def test_required_may_call_any_declared_tool_and_a_named_choice_only_that_one():
    """`tool_choice: required`: a call of one of the tools, for sure; a named function: a call
    of that one alone; `auto`: free text, a call of a declared tool taken as one; `none`:
    never a call."""
    required = shape_of(tools=[WEATHER, TIME], tool_choice="required")
    assert required.must_call and required.calls == {"weather", "time"}
    assert [s["properties"]["name"]["const"] for s in required.json_schema["anyOf"]] == [
        "weather",
        "time",
    ]
    named = shape_of(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                        "function": {"name": "time"}})  # fmt: skip
    assert named.must_call and named.calls == {"time"}
    assert named.json_schema["properties"]["name"] == {"const": "time"}
    auto = shape_of(tools=[WEATHER, TIME])
    assert not auto.must_call and auto.json_schema is None and auto.calls == {"weather", "time"}
    none = shape_of(tools=[WEATHER], tool_choice="none")
    assert not none.calls and none.json_schema is None and none.tools


def test_only_a_call_of_a_declared_tool_becomes_a_tool_call():
    from vicuna_sky.serve.structured import tool_calls

    auto = shape_of(tools=[WEATHER])
    (call,) = tool_calls(auto, '{"name": "weather", "arguments": {"city": "Paris"}}')
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert call["type"] == "function" and call["id"].startswith("call_")
    for text in (
        '{"name": "delete_everything", "arguments": {}}',  # never declared: content
        '{"name": "weather", "arguments": "Paris"}',
        '["weather"]',
        "the weather is fine",
    ):
        assert tool_calls(auto, text) is None, text
    assert tool_calls(shape_of(tools=[WEATHER], tool_choice="none"), '{"name": "weather", '
                      '"arguments": {}}') is None  # fmt: skip


def test_a_template_that_takes_tools_gets_them_and_another_has_them_described(tmp_path):
    """A tokenizer chat template that reads `tools` renders them itself (its own "Tools:"
    turn); vicuna_v1.1 cannot, so the definitions are described in its system message; and a
    template without tools never gets a tool exchange it would drop (400)."""
    from transformers import AutoTokenizer

    from vicuna_sky.data.conversation import get_template
    from vicuna_sky.serve.backends.tools import render_with_tools, takes_tools
    from vicuna_sky.serve.protocol import ApiError, GenerateRequest
    from vicuna_sky.tiny import build_tiny_llama

    request = GenerateRequest(
        model="m", messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER]
    )
    model = build_tiny_llama(tmp_path / "tools-chatml", chat_template=TOOLS_CHATML)
    knows = get_template("chat_template", AutoTokenizer.from_pretrained(model))
    assert takes_tools(knows)
    text, _ = render_with_tools(knows, request)
    assert text.startswith("<|im_start|>system\nTools: [") and '"weather"' in text
    vicuna = get_template("vicuna_v1.1")
    assert not takes_tools(vicuna)
    text, _ = render_with_tools(vicuna, request)
    assert "Tools: [" not in text and "weather" in text and "Paris" in text
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    exchange = GenerateRequest(model="m", messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])  # fmt: skip
    with pytest.raises(ApiError, match="cannot render tool calls"):
        render_with_tools(vicuna, exchange)
