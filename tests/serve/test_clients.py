"""The clients people point at the fleet: openai, langchain-openai and litellm, unchanged, against a
real controller and workers on loopback (a tiny-Llama hf worker, the same model on vLLM when a
vLLM venv is given, and an echo worker). Every request shape a model answers runs on both
engines (`tiny` and `tiny-vllm`): the same finish reasons, usage, structured output and tools.

Each client is used the way its documentation shows: chat, streaming, completions (LangChain
always sends a list of prompts), embeddings (LangChain sends token ids), structured output,
tools, and the error types each raises. Nothing here reaches past 127.0.0.1: litellm reads its
bundled model map, and tiktoken (whose BPE files live on the internet) gets a byte-level
encoding under the name LangChain asks for.
"""

import json
import os
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from vicuna_sky.serve.auth import API_KEYS_ENV

from .conftest import QUESTION, VLLM_ENV, VLLM_PYTHON, VLLM_SKIP

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported
KEY = "client-key"


class Pet(BaseModel):
    """A pet (bounded fields: a random-weight model must be able to finish it)."""

    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def fleet(module_fleet, tiny_chat_model):
    module_fleet.start_controller(env={API_KEYS_ENV: KEY})
    tiny = module_fleet.start_worker("hf", str(tiny_chat_model), "tiny")
    echo = module_fleet.start_worker("echo", "echo", "echo")
    workers = {tiny, echo}
    if VLLM_SKIP is None:
        workers.add(
            module_fleet.start_worker(
                "vllm", str(tiny_chat_model), "tiny-vllm", env=VLLM_ENV, python=VLLM_PYTHON
            )
        )
    module_fleet.wait_workers(workers, timeout=300)  # vLLM starts in 30-80 s on 2 cores
    return module_fleet


@pytest.fixture(params=["tiny", "tiny-vllm"])
def tiny(request) -> str:
    """The tiny Llama's name on each engine: hf, then vLLM."""
    if request.param == "tiny-vllm" and VLLM_SKIP is not None:
        pytest.skip(VLLM_SKIP)
    return request.param


@pytest.fixture(scope="module")
def client(fleet):
    return fleet.client(api_key=KEY)


@pytest.fixture(scope="module")
def byte_level_tiktoken():
    """LangChain's embeddings tokenize with tiktoken's cl100k_base, a file tiktoken downloads:
    a byte-level encoding registered under that name instead (token ids 0-255, which the tiny
    model's vocabulary has)."""
    import tiktoken
    import tiktoken.registry

    encoding = tiktoken.Encoding(
        name="cl100k_base",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )
    saved = tiktoken.registry.ENCODINGS.get("cl100k_base")
    tiktoken.registry.ENCODINGS["cl100k_base"] = encoding
    yield
    if saved is None:
        tiktoken.registry.ENCODINGS.pop("cl100k_base", None)
    else:
        tiktoken.registry.ENCODINGS["cl100k_base"] = saved


# -- openai ---------------------------------------------------------------------------------
def test_openai_chat_stream_and_usage(client):
    answer = client.chat.completions.create(model="echo", messages=QUESTION, max_tokens=8)
    assert answer.choices[0].message.content == "echo: hello there"
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "developer", "content": "be brief"}, *QUESTION],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert client.models.retrieve("tiny").id == "tiny"


def test_openai_completions_take_lists_and_token_ids(client, tiny):
    many = client.completions.create(model="echo", prompt=["one", "two", "three"], n=2)
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices[::2]] == ["echo: one", "echo: two", "echo: three"]
    ids = client.completions.create(model=tiny, prompt=[5, 6, 7], max_tokens=3)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens <= 3
    two = client.completions.create(model=tiny, prompt=[[5, 6], [7, 8, 9]], max_tokens=2)
    assert len(two.choices) == 2 and two.usage.prompt_tokens == 5


def test_openai_streams_several_choices_at_once(client, fleet):
    """n > 1 and a list of prompts, streamed: one stream, each chunk naming its choice, each
    choice whole and in order, the usage over all of them."""
    texts: dict[int, str] = {}
    stream = client.chat.completions.create(
        model="echo", messages=QUESTION, n=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: "echo: hello there", 1: "echo: hello there", 2: "echo: hello there"}
    finished = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(c.index for c in finished) == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3 * 3
    assert chunks[-1].usage.prompt_tokens == 2  # one prompt, counted once

    parts: dict[int, str] = {}
    for chunk in client.completions.create(model="echo", prompt=["one two", "three"], stream=True):
        for choice in chunk.choices:
            parts[choice.index] = parts.get(choice.index, "") + choice.text
    assert parts == {0: "echo: one two", 1: "echo: three"}

    # Refused by the worker before anything is sent: a plain 400, every generation let go.
    with pytest.raises(openai.BadRequestError, match="guided_choice"):
        client.chat.completions.create(
            model="echo", messages=QUESTION, n=4, stream=True, extra_body={"guided_choice": ["a"]}
        )
    assert all(w["in_flight"] == 0 and w["available"] for w in fleet.worker_states())


def test_openai_embeddings(client):
    long = client.embeddings.create(model="tiny", input="word " * 600)  # past 2048 characters
    assert len(long.data) == 1
    vectors = client.embeddings.create(model="tiny", input=[[1, 2, 3], [4, 5]])
    size = len(vectors.data[0].embedding)
    assert size > 1 and len(vectors.data[1].embedding) == size
    assert len(client.embeddings.create(model="tiny", input=[7, 8]).data[0].embedding) == size
    assert client.embeddings.create(model="tiny", input="x", dimensions=size).data
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="tiny", input="x", dimensions=size - 1)
    with pytest.raises(openai.BadRequestError, match="no_such"):
        client.embeddings.create(model="tiny", input="x", extra_body={"no_such": 1})


def test_openai_structured_output_and_tools(client, tiny):
    parsed = client.chat.completions.parse(
        model=tiny, messages=QUESTION, response_format=Pet, max_tokens=120, seed=1
    )
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    called = client.chat.completions.create(
        model=tiny, messages=QUESTION, tools=[WEATHER], tool_choice="required", max_tokens=120
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    # The call and its result, back as history: vicuna_v1.1 cannot render it, and says so.
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    with pytest.raises(openai.BadRequestError, match="cannot render tool calls"):
        client.chat.completions.create(model=tiny, messages=history, tools=[WEATHER])
    plain = client.chat.completions.create(
        model=tiny, messages=QUESTION, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert plain.choices[0].message.tool_calls is None


def test_openai_error_types(fleet, client):
    with pytest.raises(openai.AuthenticationError):
        fleet.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="echo", messages=QUESTION, max_tokens=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.get("/nowhere", cast_to=object)
    assert e.value.body["code"] == "not_found"  # OpenAI's error shape, even there


# -- langchain-openai -----------------------------------------------------------------------
def test_langchain_chat_llm_and_streaming(fleet):
    from langchain_openai import ChatOpenAI, OpenAI

    chat = ChatOpenAI(model="echo", base_url=f"{fleet.url}/v1", api_key=KEY, max_retries=0)
    assert chat.invoke("hello there").content == "echo: hello there"
    assert "".join(c.content for c in chat.stream("hello there")) == "echo: hello there"
    llm = OpenAI(model="echo", base_url=f"{fleet.url}/v1", api_key=KEY, max_retries=0)
    assert llm.invoke("hello there") == "echo: hello there"
    assert [r[0].text for r in llm.generate(["a", "b"]).generations] == ["echo: a", "echo: b"]


def test_langchain_structured_output_and_tools(fleet, tiny):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=tiny, base_url=f"{fleet.url}/v1", api_key=KEY, max_retries=0, max_tokens=120,
        seed=3,
    )  # fmt: skip
    for method in ("json_schema", "function_calling"):
        assert isinstance(chat.with_structured_output(Pet, method=method).invoke("a pet?"), Pet)
    raw = chat.with_structured_output(None, method="json_mode", include_raw=True)
    message = raw.invoke("a JSON object?")["raw"]
    if message.response_metadata["finish_reason"] == "stop":
        assert isinstance(json.loads(message.content), dict)
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    (call,) = bound.invoke("weather in Paris?").tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Oslo")


def test_langchain_embeddings_send_token_ids(fleet, byte_level_tiktoken):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="tiny", base_url=f"{fleet.url}/v1", api_key=KEY, max_retries=0
    )
    vectors = embeddings.embed_documents(["hello there", "general kenobi"])
    assert len(vectors) == 2 and len(vectors[0]) > 1
    assert embeddings.embed_query("hello") != vectors[0]


# -- litellm --------------------------------------------------------------------------------
def test_litellm(fleet, tiny):
    import litellm

    where = {"api_base": f"{fleet.url}/v1", "api_key": KEY}
    answer = litellm.completion(model="openai/echo", messages=QUESTION, **where)
    assert answer.choices[0].message.content == "echo: hello there"
    streamed = litellm.completion(model="openai/echo", messages=QUESTION, stream=True, **where)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "echo: hello there"
    texts = litellm.text_completion(model="text-completion-openai/echo", prompt=["a", "b"], **where)
    assert [c.text for c in texts.choices] == ["echo: a", "echo: b"]
    vectors = litellm.embedding(model="openai/tiny", input=["a", "b"], **where)
    assert len(vectors.data) == 2
    pet = litellm.completion(
        model=f"openai/{tiny}", messages=QUESTION, response_format=Pet, max_tokens=120, **where
    )
    Pet.model_validate_json(pet.choices[0].message.content)
    call = litellm.completion(
        model=f"openai/{tiny}", messages=QUESTION, tools=[WEATHER], tool_choice="required",
        max_tokens=120, **where,
    )  # fmt: skip
    assert call.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(model="openai/echo", messages=QUESTION, **(where | {"api_key": "x"}))
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(model="openai/echo", messages=QUESTION, max_tokens=-1, **where)
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(model="openai/nope", messages=QUESTION, **where)
