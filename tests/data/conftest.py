"""Real data for the data-pipeline tests: the Llama-2 tokenizer and FastChat's conversations."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LLAMA2 = FIXTURES / "tokenizers" / "llama2"
DUMMY = FIXTURES / "fastchat" / "dummy_conversation.json"


def _llama2(legacy: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        LLAMA2, legacy=legacy, model_max_length=2048, padding_side="right"
    )
    tok.pad_token = tok.unk_token  # as FastChat's train.py does
    return tok


@pytest.fixture(scope="session")
def llama2_path() -> Path:
    return LLAMA2


@pytest.fixture(scope="session")
def llama2():
    return _llama2(legacy=True)


@pytest.fixture(scope="session")
def llama2_nonlegacy():
    return _llama2(legacy=False)


@pytest.fixture(scope="session")
def dummy_conversations() -> list[dict]:
    return json.loads(DUMMY.read_text())


@pytest.fixture
def write_json(tmp_path):
    def write(name: str, data: object) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data, ensure_ascii=False))
        return path

    return write
