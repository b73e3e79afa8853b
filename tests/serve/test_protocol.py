"""The wire models' own checks (serve/protocol.py), without a server: schemas a decoder can
finish, token ids that are integers, bounded model names."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vicuna_sky.serve.protocol import (
    MAX_MODEL_NAME,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    check_refs,
)


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"properties": {"child": {"$ref": "#"}}},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"items": [{"$ref": "#/items/0"}]},
        {"anyOf": [{"type": "null"}, {"$ref": "#/anyOf/1"}]},
        {"$defs": {"x/y": {"$ref": "#/$defs/x~1y"}}, "$ref": "#/$defs/x~1y"},
        # The loop sits behind a sibling that is walked (and finished) first.
        {"properties": {"loop": {"$ref": "#"}, "leaf": {"type": "string"}}},
    ],
)
def test_a_schema_that_refers_back_into_itself_is_refused(schema):
    with pytest.raises(ValueError, match="recursive"):
        check_refs(schema)


@pytest.mark.parametrize(
    "schema, why",
    [
        ({"$ref": "https://example.com/s.json"}, "only references within"),
        ({"$ref": "#foo"}, "only references within"),
        ({"$ref": 7}, "only references within"),
        ({"$ref": ""}, "only references within"),
        ({"$ref": "!"}, "only references within"),
        ({"$ref": "#/$defs/missing"}, "points at nothing"),
        ({"items": [{}], "$ref": "#/items/1"}, "points at nothing"),
        ({"items": [{}], "$ref": "#/items/5"}, "points at nothing"),
        ({"items": [{}], "$ref": "#/items/x"}, "points at nothing"),
    ],
)
def test_a_reference_outside_the_schema_is_refused(schema, why):
    with pytest.raises(ValueError, match=why):
        check_refs(schema)


def test_shared_definitions_and_escaped_names_are_fine():
    shared = {"type": "integer"}
    schema = {
        "properties": {
            "a": {"$ref": "#/$defs/n"},
            "b": {"$ref": "#/$defs/n"},
            "c": {"$ref": "#/$defs/a~1b~0c"},
            "d": {"$ref": "#/items/0"},
            "e": shared,
            "f": shared,
        },
        "items": [{"type": "string"}],
        "$defs": {"n": {"type": "integer"}, "a/b~c": {"type": "boolean"}},
    }
    assert check_refs(schema) is schema
    deep: dict = {"type": "integer"}
    for _ in range(5000):  # deeper than Python's recursion: walked without recursing
        deep = {"items": deep}
    assert check_refs(deep) is deep


@pytest.mark.parametrize("prompt", [[True, False], [1.0, 2.0], [[1, 2], [True]], [[1.5]]])
def test_token_ids_are_integers(prompt):
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=prompt)
    with pytest.raises(ValidationError):
        EmbeddingRequest(model="m", input=prompt)
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]


def test_model_names_are_bounded():
    messages = [{"role": "user", "content": "hi"}]
    ChatCompletionRequest(model="m" * MAX_MODEL_NAME, messages=messages)
    for name in ("", "m" * (MAX_MODEL_NAME + 1)):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model=name, messages=messages)
        with pytest.raises(ValidationError):
            CompletionRequest(model=name, prompt="x")
        with pytest.raises(ValidationError):
            EmbeddingRequest(model=name, input="x")


def test_references_parsed_from_a_body_are_judged_by_value():
    """A body's strings are new objects (orjson makes them; the literals of a test are shared):
    `$ref` "#" must be recognised by its value, as it arrives."""
    import orjson

    with pytest.raises(ValueError, match="recursive"):
        check_refs(orjson.loads(b'{"properties": {"self": {"$ref": "#"}}}'))
    assert check_refs(orjson.loads(b'{"$defs": {"a": {}}, "$ref": "#/$defs/a"}'))
