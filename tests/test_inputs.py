"""Reading a user's JSON files (inputs.py): one line naming the file for each way it can fail."""

from __future__ import annotations

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.inputs import read_json_object


def test_a_json_object_is_read_with_its_nested_objects(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 32000, "text_config": {"hidden_size": 8}, "name": "ü"}')
    assert read_json_object(path, "text_config") == {
        "vocab_size": 32000,
        "text_config": {"hidden_size": 8},
        "name": "ü",
    }
    assert read_json_object(path, "absent") == read_json_object(path)  # absent keys are fine


@pytest.mark.parametrize(
    ("content", "nested", "message"),
    [
        (None, (), "cannot read {path}: "),
        ('{"a": ', (), "cannot read {path}: Expecting value"),
        (b"\xff\xfe", (), "cannot read {path}: 'utf-8' codec can't decode"),
        ("[1, 2]", (), "{path}: not the JSON object expected here"),
        ('{"weight_map": [1]}', ("weight_map",), "{path}: not the JSON object expected here"),
    ],
)
def test_each_failure_is_one_line_naming_the_file(tmp_path, content, nested, message):
    path = tmp_path / "model.safetensors.index.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(VicunaSkyError) as e:
        read_json_object(path, *nested)
    assert str(e.value).startswith(message.format(path=path)) and "\n" not in str(e.value)
