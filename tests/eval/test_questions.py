import json

import pytest

from vicuna_sky.assets import EVAL_TABLE
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.questions import DEMO, load_questions

from .conftest import FASTCHAT


def test_the_standard_files_load():
    vicuna = load_questions(FASTCHAT / "vicuna_bench" / "question.jsonl")
    legacy = load_questions(EVAL_TABLE / "question.jsonl")
    assert len(vicuna) == len(legacy) == 80
    # The legacy `text` field becomes a one-turn question; both files ask the same things.
    assert [q.turns for q in legacy] == [q.turns for q in vicuna]
    assert {q.category for q in vicuna} >= {"generic", "fermi", "coding", "math"}


def test_mt_bench_references_inline_and_from_a_file():
    path = FASTCHAT / "mt_bench" / "question.jsonl"
    inline = {q.question_id: q.reference for q in load_questions(path) if q.reference}
    merged = load_questions(path, FASTCHAT / "mt_bench" / "reference_answer_gpt-4.jsonl")
    assert all(len(q.turns) == 2 for q in merged)
    with_ref = {q.question_id for q in merged if q.reference}
    assert set(range(101, 131)) <= with_ref and set(inline) <= with_ref
    first = next(q for q in merged if q.question_id == 101)
    assert first.needs_reference and first.reference[0].startswith("If you have just overtaken")


def test_demo_set_ships_with_the_package():
    demo = load_questions(DEMO)
    assert len(demo) >= 5 and all(len(q.turns) == 2 for q in demo)
    assert all(q.reference for q in demo if q.needs_reference)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["not json"], r"q.jsonl:1: not JSON"),
        ([json.dumps({"category": "x", "turns": ["a"]})], "question_id must be"),
        ([json.dumps({"question_id": [1], "turns": ["a"]})], "question_id must be"),
        ([json.dumps({"question_id": 1, "turns": []})], "expected `turns`"),
        ([json.dumps({"question_id": 1, "turns": [3]})], "expected `turns`"),
        ([json.dumps({"question_id": 1, "text": "a"})] * 2, "duplicate question_id 1"),
        ([], "no questions"),
    ],
)
def test_bad_question_files(tmp_path, lines, message):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(VicunaSkyError, match=message):
        load_questions(path)


def test_missing_file():
    with pytest.raises(VicunaSkyError, match="no such file"):
        load_questions("/nonexistent/q.jsonl")
