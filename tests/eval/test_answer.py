import json

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.answer import AnswerConfig, answer
from vicuna_sky.eval.client import Endpoint
from vicuna_sky.eval.questions import DEMO, load_questions


def run(server, tmp_path, questions, **config):
    out = config.pop("output", tmp_path / "answers.jsonl")
    summary = answer(
        questions,
        Endpoint(server.url, "m"),
        AnswerConfig(out, progress=False, backoff=0.01, **config),
    )
    lines = out.read_text().splitlines() if out.exists() else []
    return summary, [json.loads(line) for line in lines]


def test_multi_turn_answers_with_category_temperatures(openai_server, tmp_path, mt_bench):
    openai_server.reply = lambda body: f"answer {len(body['messages'])}"
    summary, records = run(openai_server, tmp_path, mt_bench)
    assert summary.answered == 80 and len(records) == 80
    assert {tuple(r["choices"][0]["turns"]) for r in records} == {("answer 1", "answer 3")}
    assert {r["model_id"] for r in records} == {"m"}
    # The second turn sees the first question and the model's own first answer.
    q = mt_bench[0]
    second = next(b for b in openai_server.requests if len(b["messages"]) == 3
                  and b["messages"][0]["content"] == q.turns[0])  # fmt: skip
    assert second["messages"][1] == {"role": "assistant", "content": "answer 1"}
    assert second["messages"][2]["content"] == q.turns[1]
    temps = {}
    for body in openai_server.requests:
        category = next(
            x.category for x in mt_bench if x.turns[0] == body["messages"][0]["content"]
        )
        temps.setdefault(category, set()).add(body["temperature"])
    assert temps == {
        "writing": {0.7}, "roleplay": {0.7}, "stem": {0.1}, "humanities": {0.1},
        "math": {0.0}, "coding": {0.0}, "reasoning": {0.0}, "extraction": {0.0},
    }  # fmt: skip


def test_resume_skips_answered_and_survives_a_torn_line(openai_server, tmp_path):
    questions = load_questions(DEMO)
    openai_server.reply = lambda body: "fine"
    out = tmp_path / "answers.jsonl"
    run(openai_server, tmp_path, questions[:3], output=out)
    with out.open("a") as f:
        f.write('{"question_id": 4, "answer_id": "cut sho')  # the process died mid-write
    openai_server.requests.clear()
    summary, records = run(openai_server, tmp_path, questions, output=out)
    assert summary.skipped == 3 and summary.answered == 3
    ids = [r["question_id"] for r in records]
    assert set(ids[:3]) == {1, 2, 3} and sorted(ids) == [1, 2, 3, 4, 5, 6]
    assert len(openai_server.requests) == 6  # 3 questions x 2 turns, nothing asked twice


def test_failures_are_not_written_and_a_rerun_finishes(openai_server, tmp_path):
    questions = load_questions(DEMO)
    broken = questions[2].turns[0]
    openai_server.reply = lambda body: (
        (500, "boom") if body["messages"][0]["content"] == broken else "ok"
    )
    summary, records = run(openai_server, tmp_path, questions, retries=1)
    assert list(summary.failed) == [questions[2].question_id] and len(records) == 5
    assert "HTTP 500: boom (after 2 attempts)" in summary.failed[questions[2].question_id]
    openai_server.reply = lambda body: "ok"
    summary, records = run(openai_server, tmp_path, questions)
    assert summary.answered == 1 and len(records) == 6


def test_one_file_per_model(openai_server, tmp_path):
    out = tmp_path / "answers.jsonl"
    other = {"question_id": 1, "model_id": "other", "choices": [{"index": 0, "turns": ["a"]}]}
    out.write_text(json.dumps(other) + "\n")
    with pytest.raises(VicunaSkyError, match="holds answers of 'other', not 'm'"):
        run(openai_server, tmp_path, load_questions(DEMO), output=out)


def test_cli_answers_with_a_served_tiny_llama(cli, tmp_path):
    from vicuna_sky.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "eval" / "tiny.jsonl"
    args = ["eval", "answer", "--questions", "demo", "--model", "tiny", "--serve", str(model),
            "--max-tokens", "16", "-o", str(out)]  # fmt: skip
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all(len(r["choices"][0]["turns"]) == 2 for r in records)
    assert "6 answered, 0 already in" in result.stdout
    before = out.read_text()
    again = cli(*args)  # all there: nothing asked again, nothing written twice
    assert again.returncode == 0, again.stderr
    assert "0 answered, 6 already in" in again.stdout
    assert out.read_text() == before and len(before.splitlines()) == 6


def test_cli_needs_exactly_one_endpoint(cli, tmp_path):
    result = cli("eval", "answer", "--questions", "demo", "--model", "m", "-o", "x.jsonl")
    assert result.returncode == 2 and "give either --base-url or --serve" in result.stderr


def test_a_whole_last_line_without_newline_is_kept(openai_server, tmp_path):
    questions = load_questions(DEMO)
    openai_server.reply = lambda body: "fine"
    out = tmp_path / "answers.jsonl"
    run(openai_server, tmp_path, questions[:2], output=out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # e.g. written by another tool
    openai_server.requests.clear()
    summary, records = run(openai_server, tmp_path, questions[:3], output=out)
    assert summary.skipped == 2 and summary.answered == 1 and len(records) == 3
    assert len(openai_server.requests) == 2  # only the third question's two turns
