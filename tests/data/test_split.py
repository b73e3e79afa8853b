import json
from dataclasses import replace

import fastchat.data.split_long_conversation as fastchat_split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vicuna_sky.data.conversation import VicunaTemplate
from vicuna_sky.data.split import SplitConfig, measure_with, split, split_sample, unique_ids

WORDS = [
    "the",
    "spot",
    "instance",
    "was",
    "preempted",
    "checkpoint",
    "resume",
    "GPU",
    "é",
    "代码",
    "\n",
    "```",
    "def",
    "f(x):",
    "  ",
    "42",
    "</s>",
    "USER:",
    "$",
    "🙂",
]
text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=60).map(" ".join)
pair = st.tuples(text, text)
sample = st.builds(
    lambda pairs, system: {
        "id": "c",
        "conversations": ([{"from": "system", "value": system}] if system else [])
        + [{"from": r, "value": v} for q, a in pairs for r, v in (("human", q), ("gpt", a))],
    },
    st.lists(pair, min_size=1, max_size=6),
    st.one_of(st.none(), text),
)


def body(turns: list[dict]) -> list[dict]:
    return [t for t in turns if t["from"] != "system"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sample=sample, max_length=st.integers(40, 400), overlong=st.sampled_from(["truncate", "drop"])
)
def test_split_properties(llama2, sample, max_length, overlong):
    measure = measure_with(VicunaTemplate(), llama2)
    segments, counts = split_sample(sample, measure, llama2, max_length, overlong)
    original = body(sample["conversations"])
    system = sample["conversations"][: len(sample["conversations"]) - len(original)]
    for seg in segments:
        assert measure(seg["conversations"]) <= max_length  # every segment fits
        assert seg["conversations"][: len(system)] == system  # the system message is repeated
        roles = [t["from"] for t in body(seg["conversations"])]
        assert roles and roles == ["human", "gpt"] * (len(roles) // 2)  # non-empty, alternating
    assert len({s["id"] for s in segments}) == len(segments)
    # Walk the original rounds: each is kept whole, truncated (reported), or dropped (reported).
    out = [(seg.get("truncated", False), t) for seg in segments for t in body(seg["conversations"])]
    rounds = [out[i : i + 2] for i in range(0, len(out), 2)]
    truncated = dropped = 0
    for i in range(0, len(original), 2):
        question, answer = original[i : i + 2]
        if rounds and rounds[0][0][1] == question and rounds[0][1][1] == answer:
            rounds.pop(0)
        elif (
            rounds
            and rounds[0][0][1] == question
            and rounds[0][1][0]  # marked truncated
            and answer["value"].startswith(cut := rounds[0][1][1]["value"])
        ):
            assert cut != answer["value"]
            rounds.pop(0)
            truncated += 1
        else:
            assert measure([*system, question, answer]) > max_length  # only over-long rounds go
            dropped += 1
    assert not rounds
    assert (truncated, dropped) == (counts["rounds_truncated"], counts["rounds_dropped"])
    # "split" means what it says: two or more segments (one cut round is only "truncated").
    assert counts["conversations_split"] == (len(segments) > 1)
    assert counts["conversations_dropped"] == (not segments)
    if overlong == "drop":
        assert truncated == 0


def test_fastchat_loses_the_last_round_and_we_do_not(llama2):
    rounds = [
        ("Question number one?", "Answer one " * 8),
        ("Question two?", "Answer two " * 8),
        ("Question three?", "Answer three " * 8),
    ]
    sample = {
        "id": "x",
        "conversations": [
            {"from": r, "value": v} for q, a in rounds for r, v in (("human", q), ("gpt", a))
        ],
    }
    fastchat_split.tokenizer, fastchat_split.max_length = llama2, 70
    theirs = fastchat_split.split_one_sample(sample)
    ours, _ = split_sample(sample, measure_with(VicunaTemplate(), llama2), llama2, 70, "truncate")
    kept = lambda segs: [t["value"] for s in segs for t in s["conversations"]]  # noqa: E731
    assert "Question three?" not in kept(theirs)
    assert kept(ours) == [v for q, a in rounds for v in (q, a)]
    assert [s["id"] for s in ours] == ["x_0", "x_2", "x_4"]


def test_unique_ids_renames_collisions():
    samples = [{"id": "a_2"}, {"id": "a_2"}, {"id": "a_2"}]
    assert unique_ids(samples) == 2
    assert [s["id"] for s in samples] == ["a_2", "a_2#2", "a_2#3"]


def test_split_file_and_cli(cli, llama2_path, write_json, tmp_path, dummy_conversations):
    src = write_json("in.json", [*dummy_conversations[:40], {"id": "broken"}])
    out = tmp_path / "out.json"
    result = cli(
        "data",
        "split",
        str(src),
        "-o",
        str(out),
        "--tokenizer",
        str(llama2_path),
        "--max-length",
        "64",
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "sample 'broken': conversations: missing" in result.stderr
    segments = json.loads(out.read_text())
    assert len(segments) > 40 and len({s["id"] for s in segments}) == len(segments)
    serial = split(
        dummy_conversations[:40], SplitConfig(str(llama2_path), 64, workers=1), show_progress=False
    )
    assert serial.samples == segments
    stats = cli("data", "stats", str(out), "--tokenizer", str(llama2_path), "--max-length", "64")
    assert "over max length 0" in stats.stdout, stats.stdout + stats.stderr


def test_split_needs_pairs(llama2_path, tmp_path):
    bad = {"id": "odd", "conversations": [{"from": "human", "value": "unanswered"}]}
    report = split([bad], SplitConfig(str(llama2_path), 64, workers=1), show_progress=False)
    assert report.samples == [] and "run `vicuna-sky data clean` first" in str(report.problems[0])


def test_bad_tokenizer_is_one_line(cli, write_json, tmp_path):
    src = write_json("in.json", [])
    result = cli(
        "data",
        "split",
        str(src),
        "-o",
        str(tmp_path / "o.json"),
        "--tokenizer",
        str(tmp_path / "nope"),
        "--max-length",
        "64",
    )
    assert result.returncode == 2 and "cannot load tokenizer" in result.stderr


def _origin(segment_id: str) -> str:
    """The conversation a segment came from: `<id>_<first turn>` for split ones, `#n` renames."""
    base = segment_id.split("#")[0]
    return base.rsplit("_", 1)[0] if base.rsplit("_", 1)[-1].isdigit() else base


def test_held_out_split_never_leaks_a_conversation_and_is_deterministic(
    cli, llama2_path, write_json, tmp_path, dummy_conversations
):
    # Short context: most conversations become several segments, the case that could leak.
    conversations = dummy_conversations[:60]
    src = write_json("in.json", conversations)
    common = ["--tokenizer", str(llama2_path), "--max-length", "64", "--workers", "1"]
    out, held = tmp_path / "train.json", tmp_path / "train.eval.json"
    result = cli("data", "split", str(src), "-o", str(out), "--eval-fraction", "0.2", *common)
    assert result.returncode == 0, result.stderr
    assert "held out for evaluation: 12 conversations" in result.stdout
    train, evaluate = json.loads(out.read_text()), json.loads(held.read_text())
    train_from = {_origin(s["id"]) for s in train}
    eval_from = {_origin(s["id"]) for s in evaluate}
    assert len(eval_from) == 12 and not train_from & eval_from
    assert train_from | eval_from == {c["id"] for c in conversations}
    assert len(evaluate) > len(eval_from)  # held-out conversations were split too, all kept
    # Each segment's turns are its named conversation's: the ids tell the truth about origin.
    by_id = {c["id"]: c["conversations"] for c in conversations}
    for segment in train + evaluate:
        turns = by_id[_origin(segment["id"])]
        assert all(t in turns for t in segment["conversations"] if not segment.get("truncated"))
    # The same seed picks the same conversations, whatever the order of the file; another
    # seed picks others.
    config = SplitConfig(str(llama2_path), 64, workers=1, eval_fraction=0.2)
    again = split(list(reversed(conversations)), config, show_progress=False)
    assert {_origin(s["id"]) for s in again.held_out} == eval_from
    other = split(conversations, replace(config, seed=1), show_progress=False)
    assert {_origin(s["id"]) for s in other.held_out} != eval_from
    counted = split(conversations, replace(config, eval_count=5), show_progress=False)
    assert len({_origin(s["id"]) for s in counted.held_out}) == 5


def test_held_out_split_bad_input_is_one_line(cli, llama2_path, write_json, tmp_path):
    src = write_json("in.json", [{"id": "a", "conversations": []}] * 2)
    common = ["--tokenizer", str(llama2_path), "--max-length", "64"]
    both = cli("data", "split", str(src), "-o", str(tmp_path / "o.json"), "--eval-fraction",
               "0.5", "--eval-count", "1", *common)  # fmt: skip
    assert both.returncode == 2 and "not both" in both.stderr
    everything = cli("data", "split", str(src), "-o", str(tmp_path / "o.json"), "--eval-count",
                     "2", *common)  # fmt: skip
    assert everything.returncode != 0 and "leaves none to train on" in everything.stderr
    assert "Traceback" not in both.stderr + everything.stderr
