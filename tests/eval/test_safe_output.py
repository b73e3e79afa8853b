"""Bad input never loses data: `vicuna-sky eval answer|judge|report` with outputs that are
inputs or someone else's files, bad numbers and records, and a local fleet that cannot start
(issue #20)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert text in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def judgment(qid: int, model: str, score: object = 5) -> dict:
    return {"mode": "single", "question_id": qid, "turn": 1, "judge": "j", "model": model,
            "score": score}  # fmt: skip


@pytest.fixture
def judgments(tmp_path) -> Path:
    path = tmp_path / "judgments.jsonl"
    records = [judgment(q, m, s) for q in (1, 2) for m, s in (("a", 8), ("b", 6))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def report(cli, judgments: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("eval", "report", "--judgments", str(judgments), "--reference", "a", *extra)


def test_report_json_over_its_judgments_is_refused(cli, judgments, tmp_path):
    before = judgments.read_bytes()
    one_line_error(report(cli, judgments, "--json", str(judgments)), "is an input")
    one_line_error(report(cli, judgments, "--json", str(judgments), "--overwrite"), "is an input")
    assert judgments.read_bytes() == before


def test_report_json_over_its_questions_is_refused(cli, judgments, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q, "category": "x",
                                             "turns": ["hi"]}) + "\n" for q in (1, 2)))  # fmt: skip
    before = questions.read_bytes()
    result = report(cli, judgments, "--questions", str(questions), "--json", str(questions),
                    "--overwrite")  # fmt: skip
    one_line_error(result, "is an input")
    assert questions.read_bytes() == before


def test_report_outputs_need_overwrite(cli, judgments, tmp_path):
    out = tmp_path / "report.json"
    out.write_text("keep me")
    one_line_error(report(cli, judgments, "--json", str(out)), "pass --overwrite")
    assert out.read_text() == "keep me"
    plots = tmp_path / "plots"
    first = report(cli, judgments, "--plots", str(plots))
    assert first.returncode == 0, first.stderr
    pngs = {p.name: p.read_bytes() for p in plots.iterdir()}
    assert pngs and all(p.startswith(b"\x89PNG") for p in pngs.values())
    one_line_error(report(cli, judgments, "--plots", str(plots)), "pass --overwrite")
    assert {p.name: p.read_bytes() for p in plots.iterdir()} == pngs
    result = report(cli, judgments, "--json", str(out), "--plots", str(plots), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["reference"] == "a"
    one_line_error(report(cli, judgments, "--plots", str(out)), "is a file, not a directory")


@pytest.mark.parametrize(
    ("record", "text"),
    [
        ('{"mode": "single", "question_id": 1, "judge": "j", "model": ["m"], "score": 5}',
         "must be strings"),
        ('{"mode": "single", "question_id": 1, "judge": "j", "model": "m", "score": NaN}',
         "not JSON (NaN is not a JSON number)"),
        ('{"mode": "single", "question_id": 1, "judge": "j", "model": "m", "score": 1e999}',
         "score must be a number or null, not inf"),
        ('{"mode": "single", "question_id": 1, "judge": 3, "model": "m", "score": 5}',
         "must be strings"),
    ],
)  # fmt: skip
def test_bad_judgment_fields_are_one_line_errors(cli, judgments, tmp_path, record, text):
    with judgments.open("a") as f:
        f.write(record + "\n")
    out = tmp_path / "report.json"
    one_line_error(report(cli, judgments, "--json", str(out)), text)
    assert not out.exists()


def answer(cli, questions: str, output: Path, *extra: str, url: str = "http://127.0.0.1:9/v1"):
    return cli("eval", "answer", "--questions", questions, "--model", "m", "--base-url", url,
               "-o", str(output), "--retries", "0", *extra)  # fmt: skip


def test_answer_never_cuts_a_file_that_is_not_its_record(cli, tmp_path, openai_server):
    other = tmp_path / "other.jsonl"
    # Another model's answers, last line without its newline (as a kill leaves it).
    other.write_bytes(b'{"question_id": 1, "model_id": "x", "choices": [{"turns": ["a"]}]}\n'
                      b'{"question_id": 2, "mod')  # fmt: skip
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line one\nmy last line, no newline")
    for path, text in ((other, "holds answers of 'x'"), (notes, "not JSON")):
        before = path.read_bytes()
        one_line_error(answer(cli, "demo", path, url=openai_server.url), text)
        assert path.read_bytes() == before
    assert openai_server.requests == []


def test_answer_output_over_its_questions_is_refused(cli, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["hi"]}) + "\n")
    before = questions.read_bytes()
    one_line_error(answer(cli, str(questions), questions), "is an input")
    assert questions.read_bytes() == before


def test_answer_resume_still_repairs_its_own_torn_line(cli, tmp_path, openai_server):
    out = tmp_path / "answers.jsonl"
    first = answer(cli, "demo", out, url=openai_server.url)
    assert first.returncode == 0, first.stderr
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # killed mid-line
    again = answer(cli, "demo", out, url=openai_server.url)
    assert again.returncode == 0, again.stderr
    assert "1 answered" in again.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(lines)


def test_judge_output_over_its_answers_is_refused(cli, tmp_path, write_answers):
    from vicuna_sky.eval.questions import load_questions

    answers = write_answers(tmp_path / "a.jsonl", "m", load_questions("demo"), lambda q, t: "x")
    with answers.open("ab") as f:
        f.write(b'{"question_id": 99, "mo')  # a torn-looking tail: still never cut
    before = answers.read_bytes()
    for output in (answers, tmp_path / "prompts.jsonl"):
        if output.name == "prompts.jsonl":
            output.write_bytes(before)
        result = cli("eval", "judge", "--mode", "single", "--questions", "demo", "--answers",
                     str(answers), "--judge-model", "j", "--judge-base-url",
                     "http://127.0.0.1:9/v1", "-o", str(output))  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert output.read_bytes() == before
    assert answers.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--temperature", "nan"], "Invalid value for '--temperature'"),
        (["--temperature", "-1"], "Invalid value for '--temperature'"),
        (["--backoff", "inf"], "Invalid value for '--backoff'"),
        (["--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    ],
)
def test_answer_bad_numbers(cli, tmp_path, extra, text):
    one_line_error(answer(cli, "demo", tmp_path / "a.jsonl", *extra), text)
    assert not (tmp_path / "a.jsonl").exists()


def test_questions_that_are_not_utf8(cli, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"question_id": 1, "turns": ["caf\xe9"]}\n')
    one_line_error(answer(cli, str(questions), tmp_path / "a.jsonl"), "is not UTF-8 text")


def _fleet_processes(logs: Path) -> list[psutil.Process]:
    """Processes whose command line names the fleet's directory (its controller and workers)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(logs) in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _serve_cmd(tmp_path: Path, model: str) -> list[str]:
    exe = Path(sys.executable).parent / "vicuna-sky"
    return [str(exe), "eval", "answer", "--questions", "demo", "--model", "m", "--serve", model,
            "-o", str(tmp_path / "a.jsonl")]  # fmt: skip


def test_serve_a_model_that_is_not_there_fails_fast(cli, tmp_path):
    start = time.monotonic()
    result = cli(*_serve_cmd(tmp_path, "/nope")[1:], timeout=240)
    one_line_error(result, "cannot serve /nope: the worker")
    assert time.monotonic() - start < 180
    assert _fleet_processes(tmp_path / ".fleet-m") == []
    assert not (tmp_path / "a.jsonl").exists()


def test_sigterm_while_the_fleet_starts_stops_it(tmp_path):
    logs = tmp_path / ".fleet-m"
    proc = subprocess.Popen(_serve_cmd(tmp_path, str(tmp_path / "no-model")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _fleet_processes(logs):  # the controller is starting: the CLI waits for it
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err.decode()
    assert _fleet_processes(logs) == []
    assert os.listdir(tmp_path) == [".fleet-m"]


def test_judge_serve_a_model_that_is_not_there_fails_fast(cli, tmp_path, write_answers):
    from vicuna_sky.eval.questions import load_questions

    answers = write_answers(tmp_path / "a.jsonl", "m", load_questions("demo"), lambda q, t: "x")
    result = cli("eval", "judge", "--mode", "single", "--questions", "demo", "--answers",
                 str(answers), "--judge-model", "j", "--judge-serve", "/nope",
                 "-o", str(tmp_path / "j.jsonl"), timeout=240)  # fmt: skip
    one_line_error(result, "cannot serve /nope: the worker")
    assert _fleet_processes(tmp_path / ".fleet-judge-j") == []
    assert not (tmp_path / "j.jsonl").exists()
