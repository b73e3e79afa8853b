import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.client import Endpoint
from vicuna_sky.eval.judge import JudgeConfig, judge, load_answers, parse_grade, parse_verdict
from vicuna_sky.eval.prompts import BUILTIN, load_prompts

FASTCHAT = Path(__file__).resolve().parents[1] / "fixtures" / "fastchat"
FASTCHAT_PROMPTS = FASTCHAT / "judge_prompts.jsonl"


def grade_by_quality(server):
    """A judge that likes answers containing GOOD."""

    def reply(body):
        text = server.user_text(body)
        last = text.rsplit("### User", 1)[-1] if "### User" in text else text
        return "Solid. Grade: [[9]]" if "GOOD" in last else "Weak. Grade: [[3]]"

    return reply


def run_judge(server, tmp_path, questions, answers, models, mode, **config):
    out = config.pop("output", tmp_path / f"{mode}.jsonl")
    prompts = config.pop("prompts", load_prompts(None))
    cfg = JudgeConfig(mode, out, progress=False, backoff=0.01, **config)
    summary = judge(questions, answers, models, Endpoint(server.url, "judge-1"), prompts, cfg)
    lines = out.read_text().splitlines() if out.exists() else []
    return summary, [json.loads(line) for line in lines]


@pytest.fixture
def two_models(tmp_path, mt_bench, write_answers):
    good = write_answers(tmp_path / "good.jsonl", "good", mt_bench, lambda q, t: f"GOOD {t}")
    bad = write_answers(tmp_path / "bad.jsonl", "bad", mt_bench, lambda q, t: f"meh {t}")
    return load_answers([good, bad])


def test_parsers():
    assert parse_grade("reasons... Rating: [[7]]") == 7
    assert parse_grade("[[2]] at first, then on reflection [[8.5]]") == 8.5
    assert parse_grade("Rating: [6]") == 6
    for bad in ("no verdict", "[[11]]", "[[0]]"):
        with pytest.raises(ValueError):
            parse_grade(bad)
    assert parse_verdict("A is longer but [[B]] is right") == "B"
    assert parse_verdict("[[C]]") == "C"
    with pytest.raises(ValueError):
        parse_verdict("assistant A wins")


def test_single_grades_every_turn_with_references(openai_server, tmp_path, mt_bench, two_models):
    openai_server.reply = grade_by_quality(openai_server)
    summary, records = run_judge(
        openai_server, tmp_path, mt_bench, two_models, ["good", "bad"], "single"
    )
    assert summary.judged == len(records) == 80 * 2 * 2 and summary.unparsed == 0
    scores = {(r["model"], r["question_id"], r["turn"]): r["score"] for r in records}
    assert {s for (m, *_), s in scores.items() if m == "good"} == {9.0}
    assert {s for (m, *_), s in scores.items() if m == "bad"} == {3.0}
    assert all(r["judge"] == "judge-1" and r["error"] is None for r in records)
    by_prompt = Counter(r["prompt"] for r in records)
    with_ref = sum(
        1 for q in mt_bench if q.reference and q.category in ("math", "reasoning", "coding")
    )
    assert by_prompt["single-math-v1"] == by_prompt["single-math-v1-multi-turn"] == 2 * with_ref
    assert by_prompt["single-v1"] == 2 * (80 - with_ref)
    # What the judge was shown: the reference for math, both turns for turn 2.
    q = next(q for q in mt_bench if q.category == "math" and q.reference)
    asked = [b for b in openai_server.requests if q.turns[1] in openai_server.user_text(b)]
    text = openai_server.user_text(asked[0])
    assert q.reference[0] in text and q.reference[1] in text and q.turns[0] in text
    assert all(b["temperature"] == 0 for b in openai_server.requests)


def test_pairwise_asks_both_orders_and_counts_position_bias(
    openai_server, tmp_path, mt_bench, two_models
):
    def prefers_good(body):
        text = openai_server.user_text(body)
        a = text.index("assistant A")
        b = text.index("assistant B")
        good_first = text.find("GOOD", a) < b
        return "[[A]]" if good_first else "[[B]]"

    openai_server.reply = prefers_good
    questions = mt_bench[:10]
    summary, records = run_judge(
        openai_server, tmp_path, questions, two_models, ["good"], "pairwise", baseline="bad"
    )
    assert summary.judged == 20 and len(openai_server.requests) == 40
    assert all(r["g1_winner"] == r["g2_winner"] == r["winner"] == "good" for r in records)

    # A judge that always says "A": each order crowns the other model -> inconsistent.
    openai_server.reply = lambda body: "First one. [[A]]"
    _, records = run_judge(
        openai_server,
        tmp_path,
        questions,
        two_models,
        ["good"],
        "pairwise",
        baseline="bad",
        output=tmp_path / "biased.jsonl",
    )
    assert {(r["g1_winner"], r["g2_winner"], r["winner"]) for r in records} == {
        ("good", "bad", "inconsistent")
    }


def test_unreadable_verdicts_are_recorded_and_redone_on_request(
    openai_server, tmp_path, mt_bench, two_models
):
    questions = mt_bench[:4]
    openai_server.reply = lambda body: "I cannot decide."
    summary, records = run_judge(openai_server, tmp_path, questions, two_models, ["good"], "single")
    assert summary.unparsed == summary.judged == 8
    assert all(r["score"] is None and "no [[grade]]" in r["error"] for r in records)
    assert records[0]["judgment"] == "I cannot decide."

    openai_server.reply = lambda body: "[[6]]"
    summary, _ = run_judge(openai_server, tmp_path, questions, two_models, ["good"], "single")
    assert summary.skipped == 8 and summary.judged == 0  # a plain rerun does not pay again
    summary, records = run_judge(
        openai_server, tmp_path, questions, two_models, ["good"], "single", redo_failed=True
    )
    assert summary.judged == 8 and records[-1]["score"] == 6.0


def test_transient_failures_are_retried(openai_server, tmp_path, mt_bench, two_models):
    seen = Counter()

    def flaky(body):
        key = openai_server.user_text(body)
        seen[key] += 1
        if seen[key] == 1:
            return (503, "overloaded")
        if seen[key] == 2:
            return (429, "slow down")
        return "[[7]]"

    openai_server.reply = flaky
    summary, records = run_judge(
        openai_server, tmp_path, mt_bench[:3], two_models, ["good"], "single"
    )
    assert summary.judged == 6 and not summary.failed
    assert summary.requests == 18 and {r["score"] for r in records} == {7.0}


def test_failing_requests_are_left_for_the_rerun(openai_server, tmp_path, mt_bench, two_models):
    questions = mt_bench[:3]
    target = questions[1].turns[0]
    openai_server.reply = lambda body: (
        (500, "boom") if target in openai_server.user_text(body) else "[[5]]"
    )
    summary, records = run_judge(
        openai_server, tmp_path, questions, two_models, ["good"], "single", retries=1
    )
    assert len(summary.failed) == 2 and summary.judged == 4  # both turns mention the question
    assert questions[1].question_id not in {r["question_id"] for r in records}
    openai_server.reply = lambda body: "[[5]]"
    summary, records = run_judge(openai_server, tmp_path, questions, two_models, ["good"], "single")
    assert summary.judged == 2 and summary.skipped == 4 and len(records) == 6


def test_a_client_error_is_not_retried(openai_server, tmp_path, mt_bench, two_models):
    openai_server.reply = lambda body: (401, "bad key")
    summary, _ = run_judge(openai_server, tmp_path, mt_bench[:1], two_models, ["good"], "single")
    assert len(openai_server.requests) == 2 and len(summary.failed) == 2
    assert "HTTP 401: bad key" in next(iter(summary.failed.values()))


def test_fastchat_prompt_file_drops_in(openai_server, tmp_path, mt_bench, two_models):
    openai_server.reply = lambda body: "Rating: [[4]]"
    prompts = load_prompts(FASTCHAT_PROMPTS)
    assert set(prompts) == set(BUILTIN)
    cfg = JudgeConfig("single", tmp_path / "fc.jsonl", progress=False)
    judge(mt_bench[:2], two_models, ["good"], Endpoint(openai_server.url, "j"), prompts, cfg)
    # FastChat's wording went out (its rating format sits in the prompt or the system message).
    texts = [" ".join(m["content"] for m in body["messages"]) for body in openai_server.requests]
    assert len(texts) == 4 and all("[[rating]]" in t for t in texts)


def test_unknown_model_is_a_clear_error(openai_server, tmp_path, mt_bench, two_models):
    with pytest.raises(VicunaSkyError, match="no answers from 'nobody'"):
        run_judge(openai_server, tmp_path, mt_bench, two_models, ["nobody"], "single")


def test_cli_resumes_after_a_kill(openai_server, tmp_path, mt_bench, write_answers, cli):
    questions = mt_bench[:20]
    good = write_answers(tmp_path / "good.jsonl", "good", questions, lambda q, t: f"GOOD {t}")
    bad = write_answers(tmp_path / "bad.jsonl", "bad", questions, lambda q, t: f"meh {t}")
    openai_server.reply = lambda body: "[[B]]"
    openai_server.delay = 0.05
    out = tmp_path / "pairs.jsonl"
    args = [
        "eval", "judge", "--mode", "pairwise",
        "--questions", str(MT_BENCH), "--answers", str(good), "--answers", str(bad),
        "--model", "good", "--baseline", "bad",
        "--judge-model", "j", "--judge-base-url", openai_server.url,
        "--concurrency", "2", "-o", str(out),
    ]  # fmt: skip
    exe = Path(sys.executable).parent / "vicuna-sky"
    proc = subprocess.Popen(
        [str(exe), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 8:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out.read_text().count("\n")
    assert 8 <= first < 40
    requests_before = len(openai_server.requests)

    done = cli(*args)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = Counter((r["question_id"], r["turn"]) for r in records)
    assert len(keys) == 40 and set(keys.values()) == {1}  # each judged once, none twice
    assert len(openai_server.requests) - requests_before == 2 * (40 - first)
    assert re.search(rf"{40 - first} judged .* {first} already in", done.stdout)


MT_BENCH = FASTCHAT / "mt_bench" / "question.jsonl"


def test_a_pair_is_the_same_in_either_order(openai_server, tmp_path, mt_bench, two_models):
    openai_server.reply = lambda body: "[[C]]"
    out = tmp_path / "pairs.jsonl"
    args = (openai_server, tmp_path, mt_bench[:3], two_models)
    first, _ = run_judge(*args, ["good"], "pairwise", baseline="bad", output=out)
    again, records = run_judge(*args, ["bad"], "pairwise", baseline="good", output=out)
    assert first.judged == 6 and again.skipped == 6 and again.judged == 0 and len(records) == 6


def test_question_ids_match_as_text(openai_server, tmp_path, mt_bench, write_answers):
    """Answer files that write "81" for the questions' 81 are still judged."""
    path = write_answers(tmp_path / "a.jsonl", "m", mt_bench[:2], lambda q, t: "x")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(
        "".join(json.dumps(r | {"question_id": str(r["question_id"])}) + "\n" for r in lines)
    )
    openai_server.reply = lambda body: "[[5]]"
    summary, _ = run_judge(
        openai_server, tmp_path, mt_bench[:2], load_answers([path]), ["m"], "single"
    )
    assert summary.judged == 4
    with pytest.raises(VicunaSkyError, match="no question has answers"):
        run_judge(openai_server, tmp_path, mt_bench[2:4], load_answers([path]), ["m"], "single")


def test_a_reference_too_short_for_turn_two_is_not_used_there(
    openai_server, tmp_path, write_answers
):
    from vicuna_sky.eval.questions import Question

    q = Question(1, "math", ["What is 2+2?", "And 3+3?"], ["4"])
    answers = load_answers([write_answers(tmp_path / "a.jsonl", "m", [q], lambda q, t: "x")])
    openai_server.reply = lambda body: "[[5]]"
    _, records = run_judge(openai_server, tmp_path, [q], answers, ["m"], "single")
    assert {r["turn"]: r["prompt"] for r in records} == {
        1: "single-math-v1",
        2: "single-v1-multi-turn",
    }


def test_answer_records_are_not_judgments(openai_server, tmp_path, mt_bench, two_models):
    out = tmp_path / "single.jsonl"
    out.write_text(json.dumps({"question_id": 81, "model_id": "m", "choices": []}) + "\n")
    with pytest.raises(VicunaSkyError, match="not single judgments"):
        run_judge(openai_server, tmp_path, mt_bench[:1], two_models, ["good"], "single", output=out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--retries", "-1"], "Invalid value for '--retries'"),
        (["--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["--judge-base-url", "http://[::1"], "not a URL"),
        (["--judge-base-url", "127.0.0.1:8000/v1"], "not an http(s) URL"),
        (["-o", "."], "Is a directory"),
    ],
)
def test_cli_bad_values_are_one_line_errors(cli, tmp_path, write_answers, extra, message):
    from vicuna_sky.eval.questions import load_questions

    answers = write_answers(tmp_path / "a.jsonl", "m", load_questions("demo"), lambda q, t: "x")
    args = ["eval", "judge", "--mode", "single", "--questions", "demo", "--answers", str(answers),
            "--judge-model", "j", "--judge-base-url", "http://127.0.0.1:9/v1",
            "-o", "j.jsonl"]  # fmt: skip
    result = cli(*args, *extra)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_error_text_is_printed_verbatim(cli, tmp_path):
    bad = tmp_path / "q[bold].jsonl"  # rich would read [bold] as markup and drop it
    bad.write_text("[1, 2]\n")
    result = cli("eval", "answer", "--questions", str(bad), "--model", "m",
                 "--base-url", "http://127.0.0.1:9/v1", "-o", "a.jsonl")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "q[bold].jsonl:1: expected a JSON object per line" in " ".join(result.stderr.split())


def test_records_name_a_local_judge_as_such(openai_server, tmp_path, mt_bench, two_models):
    openai_server.reply = lambda body: "[[5]]"
    _, records = run_judge(
        openai_server, tmp_path, mt_bench[:1], two_models, ["good"], "single",
        judge_label="judge-1 (local model)",
    )  # fmt: skip
    assert {r["judge"] for r in records} == {"judge-1 (local model)"}
    assert {b["model"] for b in openai_server.requests} == {"judge-1"}  # asked by its name


def test_guided_choice_asks_for_exactly_the_verdicts_the_parsers_read(
    openai_server, tmp_path, mt_bench, two_models
):
    from vicuna_sky.eval.judge import GRADE_CHOICES, VERDICT_CHOICES

    def pick(body):  # a judge that can only say one of the strings it was offered
        allowed = body.get("guided_choice") or ["no verdict at all"]
        return allowed[len(server_text(body)) % len(allowed)]

    server_text = openai_server.user_text
    openai_server.reply = pick
    few = mt_bench[:5]
    summary, records = run_judge(
        openai_server, tmp_path, few, two_models, ["good", "bad"], "single", guided_choice=True
    )
    assert summary.unparsed == 0 and len(records) == 5 * 2 * 2
    assert {r["score"] for r in records} <= set(range(1, 11))
    assert all(b["guided_choice"] == GRADE_CHOICES for b in openai_server.requests)
    assert [f"[[{n}]]" for n in range(1, 11)] == GRADE_CHOICES
    summary, records = run_judge(
        openai_server, tmp_path, few, two_models, ["good", "bad"], "pairwise", guided_choice=True
    )
    assert summary.unparsed == 0 and len(records) == 5 * 2
    assert openai_server.requests[-1]["guided_choice"] == VERDICT_CHOICES
    # Off (the default for an endpoint that may not know the extension): not asked, and this
    # judge then has no readable verdict.
    openai_server.requests.clear()
    summary, _ = run_judge(
        openai_server, tmp_path, few, two_models, ["good"], "single", output=tmp_path / "x.jsonl"
    )
    assert summary.unparsed == summary.judged == 10
    assert not any("guided_choice" in b for b in openai_server.requests)


def test_a_locally_served_judge_always_gives_a_readable_verdict(cli, tmp_path, write_answers):
    """--judge-serve: a random-weight tiny Llama as the judge, its verdicts constrained to the
    allowed strings by the fleet's hf worker."""
    from vicuna_sky.eval.questions import load_questions
    from vicuna_sky.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    questions = load_questions("demo")[:2]
    a = write_answers(tmp_path / "a.jsonl", "a", questions, lambda q, t: f"a answer {t}")
    b = write_answers(tmp_path / "b.jsonl", "b", questions, lambda q, t: f"b answer {t}")
    for mode, extra in (("single", []), ("pairwise", ["--baseline", "b"])):
        out = tmp_path / f"{mode}.jsonl"
        result = cli(
            "eval",
            "judge",
            "--mode",
            mode,
            "--questions",
            "demo",
            "--answers",
            str(a),
            "--answers",
            str(b),
            *extra,
            "--judge-model",
            "tiny",
            "--judge-serve",
            str(model),
            "--max-tokens",
            "8",
            "-o",
            str(out),
            "--concurrency",
            "2",
        )
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert records and all(r["error"] is None for r in records)
    assert len((tmp_path / "single.jsonl").read_text().splitlines()) == 2 * 2 * 2
    assert len((tmp_path / "pairwise.jsonl").read_text().splitlines()) == 2 * 2
