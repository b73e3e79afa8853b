import contextlib
import copy
import io
import json

import pytest
from fastchat.data.clean_sharegpt import clean_html_all

from vicuna_sky.data.clean import CleanConfig, clean, clean_sample
from vicuna_sky.errors import VicunaSkyError

ANSWER = '<div class="markdown prose w-full"><p>{}</p></div>'


def conv(cid: str, *turns: tuple[str, str], **extra) -> dict:
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def qa(cid: str, q: str = "How do I sort a list?", a: str = "Use sorted(xs).") -> dict:
    return conv(cid, ("human", q), ("gpt", ANSWER.format(a)))


def rule_of(sample: dict, **config) -> str:
    return clean_sample(sample, CleanConfig(**config))[1]


def test_a_good_conversation_is_converted():
    sample, rule, _ = clean_sample(qa("a"), CleanConfig())
    assert rule == "kept"
    assert sample["conversations"][1] == {"from": "gpt", "value": "Use sorted(xs)."}


def test_leading_assistant_and_trailing_question_are_dropped():
    sample = conv(
        "a",
        ("gpt", "Hi! How can I help?"),
        ("human", "Sort a list?"),
        ("gpt", ANSWER.format("Use sorted().")),
        ("human", "And reverse it?"),
    )
    out, rule, _ = clean_sample(sample, CleanConfig())
    assert rule == "kept"
    assert [t["from"] for t in out["conversations"]] == ["human", "gpt"]


def test_system_turn_is_kept():
    sample = conv(
        "a",
        ("system", "You are terse."),
        ("human", "Sort a list?"),
        ("gpt", "Use sorted(xs), it returns a new list."),
    )
    out, rule, _ = clean_sample(sample, CleanConfig())
    assert rule == "kept" and out["conversations"][0]["from"] == "system"


@pytest.mark.parametrize(
    ("sample", "rule"),
    [
        (conv("a", ("human", "hello?")), "too_short"),
        (conv("a", ("human", "hi"), ("gpt", "yo")), "too_short"),
        (
            conv("a", ("human", "q?"), ("human", "q again?"), ("gpt", "an answer here")),
            "wrong_roles",
        ),
        (qa("a", q="What is OpenAI's newest model?"), "blocked_words"),
        (qa("a", a="As ChatGPT, I cannot browse."), "blocked_words"),
        (qa("a", a="!Too many requests in 1 hour. Try again later."), "blocked_response"),
        (conv("a", ("human", "Tell me something"), ("gpt", "")), "empty_answer"),
    ],
)
def test_filters(sample, rule):
    assert rule_of(sample) == rule


def test_pathological_html_is_dropped_and_counted_not_raised():
    # libxml2 gives up past its nesting limit and keeps no text: the answer counts as empty.
    nested = "<div>" * 5000 + "deep</p>" + "</div>" * 5000
    assert clean_sample(qa("a", a=nested), CleanConfig())[:2] == (None, "empty_answer")


def test_blocked_words_are_configurable():
    assert rule_of(qa("a", q="What about OpenAI?"), blocked_words=()) == "kept"
    assert rule_of(qa("a", a="Use sorted, or numpy."), blocked_words=("numpy",)) == (
        "blocked_words"
    )


def test_an_empty_answer_ends_the_conversation_there():
    sample = conv(
        "a",
        ("human", "First question here"),
        ("gpt", "First answer here"),
        ("human", "Second question"),
        ("gpt", ANSWER.format("")),
        ("human", "Third"),
        ("gpt", "Third answer"),
    )
    out, rule, _ = clean_sample(sample, CleanConfig())
    assert rule == "kept" and len(out["conversations"]) == 2


def test_language_filter():
    english = qa(
        "en",
        q="How do I read a file line by line in Python?",
        a="Open it with a with-statement and iterate over the file object.",
    )
    german = qa(
        "de",
        q="Wie lese ich eine Datei Zeile für Zeile in Python?",
        a="Öffne sie mit einer with-Anweisung und iteriere über das Dateiobjekt.",
    )
    assert rule_of(english, lang="en") == "kept"
    assert rule_of(german, lang="en") == "language"
    assert rule_of(german, lang="de") == "kept"
    with pytest.raises(VicunaSkyError, match="unknown language code 'english'"):
        clean([english], CleanConfig(lang="english"), show_progress=False)


def test_duplicates_and_counts():
    samples = [
        qa("a"),
        qa("a", q="Another question entirely?"),
        qa("b"),
        qa("c", q="Yet another?"),
        qa("d", q="plug?", a="Ran a plugin.") | {"plugins": []},
        conv("e", ("human", "hi")),
    ]
    report = clean(samples, CleanConfig(workers=1), show_progress=False)
    assert [s["id"] for s in report.samples] == ["a", "c"]
    assert dict(report.counts) == {
        "kept": 2,
        "duplicate_id": 1,
        "duplicate_content": 1,
        "plugins": 1,
        "too_short": 1,
    }


def test_duplicates_are_the_first_question_and_answer_whatever_the_system_prompt():
    """Issue #30 row 9: the key is the first (question, answer), the system turn left out: the
    same question answered otherwise is kept, the same pair under another system prompt (or
    none) is a duplicate."""
    q, a = "How do I sort a list?", "Use sorted(xs), it returns a new list."

    def with_system(cid: str, system: str, answer: str = a) -> dict:
        return conv(cid, ("system", system), ("human", q), ("gpt", ANSWER.format(answer)))

    samples = [
        with_system("a", "You are terse."),
        with_system("b", "You are terse.", answer="Call xs.sort() to sort it in place."),
        with_system("c", "You are a pirate."),
        qa("d", q=q, a=a),
    ]
    report = clean(samples, CleanConfig(workers=1), show_progress=False)
    assert [s["id"] for s in report.samples] == ["a", "b"]
    assert report.dropped == [("c", "duplicate_content"), ("d", "duplicate_content")]


def test_same_result_as_fastchat_in_parallel_and_serial(dummy_conversations):
    """FastChat's dummy data is plain text: there, its cleaning is right and ours must agree."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        reference = clean_html_all(copy.deepcopy(dummy_conversations), 0, None)
    serial = clean(dummy_conversations, CleanConfig(workers=1), show_progress=False)
    parallel = clean(dummy_conversations, CleanConfig(workers=2), show_progress=False)
    assert serial.samples == reference
    assert parallel.samples == serial.samples and parallel.counts == serial.counts
    assert dict(serial.counts) == {"kept": 294, "duplicate_content": 146, "blocked_words": 60}


def test_cli_reports_bad_samples_and_keeps_good_ones(cli, write_json, tmp_path):
    src = write_json(
        "in.json",
        [
            qa("good-1"),
            {"id": "no-turns"},
            conv("bad-type", ("human", "hi")) | {"conversations": [{"from": "human", "value": 3}]},
            {"id": "bad-role", "conversations": [{"from": "bot", "value": "x"}]},
            "not an object",
            qa("good-2", q="Another question?"),
        ],
    )
    out = tmp_path / "out.json"
    result = cli("data", "clean", str(src), "-o", str(out), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "sample 'no-turns': conversations: missing" in result.stderr
    assert "sample 'bad-type': conversations[0].value: expected a string, got int" in result.stderr
    assert "sample 'bad-role': conversations[0].from: unknown role 'bot'" in result.stderr
    assert "sample #4: sample: expected an object, got str" in result.stderr
    assert [s["id"] for s in json.loads(out.read_text())] == ["good-1", "good-2"]
    assert "malformed" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON"),
        ('{"id": 1}', "expected a JSON list of samples, got dict"),
        ('[{"id": 1}]', "none of its 1 samples is well-formed"),
    ],
)
def test_cli_unusable_input_is_one_line(cli, tmp_path, content, message):
    src = tmp_path / "in.json"
    src.write_text(content)
    result = cli("data", "clean", str(src), "-o", str(tmp_path / "out.json"))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


def test_dropped_ids_are_written_with_their_rule(cli, write_json, tmp_path):
    """`--dropped FILE` names every conversation a filter left out, and why."""
    src = write_json(
        "in.json",
        [
            qa("a"),
            qa("b", q="What does OpenAI make?"),
            qa("a"),
            conv("e", ("human", "hi")),
            qa("c", q="Another question entirely?"),
        ],
    )
    args = ("data", "clean", str(src), "-o", "out.json", "--workers", "1")
    result = cli(*args, "--dropped", "dropped.jsonl")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert lines == [
        {"id": "b", "rule": "blocked_words"},
        {"id": "a", "rule": "duplicate_id"},
        {"id": "e", "rule": "too_short"},
    ]
    assert "dropped ids: dropped.jsonl (3)" in result.stdout
    # Never an input, never over a file without --overwrite.
    again = cli(*args, "--overwrite", "--dropped", "in.json")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert json.loads(src.read_text())[0]["id"] == "a"
