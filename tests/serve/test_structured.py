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
    """Sampled at temperature 1 with 20 seeds: a random-weight model and a real small one."""
    fleet.start_controller()
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
