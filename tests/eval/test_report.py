"""The evaluation report: the Vicuna blog's numbers from FastChat's review files, our judgment
format (failures, duplicates, position bias), the JSON document, the PNG figures, bad input."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from vicuna_sky.assets import BLOG_REVIEWS as BLOG
from vicuna_sky.assets import EVAL_TABLE
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.plots import draw_plots, render_report, report_tables, write_json
from vicuna_sky.eval.report import build_report

REVIEWS = EVAL_TABLE / "review"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ["relative_quality.png", "scores_by_category.png", "win_tie_loss.png"]


@pytest.fixture(scope="module")
def blog():
    return build_report("gpt35", legacy_reviews=BLOG)


def test_blog_relative_quality(blog):
    """The blog's figure: LLaMA-13B 68 %, Alpaca-13B 76 %, Bard 93 %, Vicuna-13B 92 % of ChatGPT."""
    relative = {name: m.relative for name, m in blog.models.items()}
    assert relative == pytest.approx(
        {"gpt35": 1.0, "llama-13b": 0.68, "alpaca-13b": 0.76, "bard": 0.93, "vicuna-13b": 0.92},
        abs=0.005,
    )
    assert relative["llama-13b"] == pytest.approx(513 / 694 * 638 / 693)
    assert relative["vicuna-13b"] == pytest.approx(638 / 693)
    assert blog.models["bard"].relative_via == ["bard", "vicuna-13b", "gpt35"]
    assert blog.models["gpt35"].relative_via == ["gpt35"]
    assert blog.kind == "legacy-reviews"
    assert blog.judges == ["gpt-4-0328-coding", "gpt-4-0328-generic", "gpt-4-0328-math"]
    assert blog.questions == str(EVAL_TABLE / "question.jsonl")
    assert blog.failures == {"single": 0, "pairwise": 0}


def test_blog_categories_and_games(blog):
    assert blog.categories == [
        "generic",
        "knowledge",
        "roleplay",
        "common-sense",
        "fermi",
        "counterfactual",
        "coding",
        "math",
        "writing",
    ]
    for name, model in blog.models.items():
        assert set(model.categories) == set(blog.categories), name
    # vicuna-13b is in all four pair files: its means are over its 4 x 80 reviews
    assert blog.models["vicuna-13b"].n_scores == 320
    assert blog.models["gpt35"].n_scores == 80
    assert blog.models["gpt35"].overall == pytest.approx(693 / 80)
    gpt35 = next(p for p in blog.pairs if "gpt35" in (p.model_a, p.model_b))
    assert (gpt35.model_a, gpt35.model_b, gpt35.games) == ("gpt35", "vicuna-13b", 80)
    assert (gpt35.total_a, gpt35.total_b) == (693, 638)
    assert gpt35.wins_a + gpt35.ties + gpt35.wins_b == 80
    vicuna = blog.models["vicuna-13b"]
    assert vicuna.opponents["gpt35"] == {
        "wins": gpt35.wins_b,
        "ties": gpt35.ties,
        "losses": gpt35.wins_a,
    }
    assert vicuna.wins + vicuna.ties + vicuna.losses == 320
    assert vicuna.win_rate == pytest.approx((vicuna.wins + vicuna.ties / 2) / 320)


@pytest.mark.parametrize(
    ("directory", "vicuna"),
    [
        ("vicuna-13b_20230322-new-hp-fp16", "vicuna-13b-20230322-new-hp-fp16"),
        ("vicuna-7b_20230322-fp16", "vicuna-7b"),
    ],
)
def test_other_review_directories(directory, vicuna):
    report = build_report("gpt35", legacy_reviews=REVIEWS / directory)
    assert set(report.models) == {"gpt35", "alpaca-13b", "bard", "llama", vicuna}
    assert report.models["gpt35"].relative == 1.0
    assert all(0.5 < m.relative < 1.0 for n, m in report.models.items() if n != "gpt35")
    assert len(report.categories) == 9


def test_a_model_with_no_chain_to_the_reference(tmp_path):
    shutil.copy(BLOG / "review_gpt35_vicuna-13b.jsonl", tmp_path)
    shutil.copy(REVIEWS / "others" / "review_llama_alpaca-13b.jsonl", tmp_path)
    report = build_report("gpt35", legacy_reviews=tmp_path, questions=EVAL_TABLE / "question.jsonl")
    assert report.models["vicuna-13b"].relative == pytest.approx(638 / 693)
    for name in ("llama", "alpaca-13b"):
        assert report.models[name].relative is None
        assert "gpt35" in report.models[name].relative_note
    document = json.loads(write_json(report, tmp_path / "r.json").read_text())
    assert document["models"]["llama"]["relative"] is None
    assert [p.name for p in draw_plots(report, tmp_path / "plots")] == PLOTS


def test_unparsed_legacy_review_is_a_failure_not_a_score(tmp_path):
    lines = (BLOG / "review_gpt35_vicuna-13b.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["score"] = [-1, -1]  # what FastChat wrote when it could not parse GPT-4's review
    lines[0] = json.dumps(first)
    reviews = tmp_path / "review" / "run"
    reviews.mkdir(parents=True)
    (reviews / "review_gpt35_vicuna-13b.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(EVAL_TABLE / "question.jsonl", tmp_path)  # found two levels up, by default
    report = build_report("gpt35", legacy_reviews=reviews)
    assert report.failures == {"single": 0, "pairwise": 1}
    assert report.models["gpt35"].n_scores == 79
    assert report.models["gpt35"].failures == 1
    assert report.pairs[0].games == 79


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _single(qid, category, turn, model, score, error=None):
    return {
        "mode": "single",
        "question_id": qid,
        "category": category,
        "turn": turn,
        "model": model,
        "judge": "gpt-4",
        "prompt": "single-v1",
        "score": score,
        "judgment": f"[[{score}]]",
        "error": error,
        "tstamp": 1700000000.0,
    }


def _pair(qid, a, b, winner, error=None):
    g1, g2 = (a, b) if winner == "inconsistent" else (winner, winner)
    return {
        "mode": "pairwise",
        "question_id": qid,
        "category": "generic",
        "turn": 1,
        "model_a": a,
        "model_b": b,
        "judge": "gpt-4",
        "prompt": "pair-v2",
        "g1_winner": g1,
        "g2_winner": g2,
        "winner": winner,
        "g1_judgment": "",
        "g2_judgment": "",
        "error": error,
        "tstamp": 1.0,
    }


GPT = "gpt-3.5-turbo"


@pytest.fixture
def judgments(tmp_path):
    single = _write_jsonl(
        tmp_path / "single.jsonl",
        [
            _single(1, "writing", 1, "vicuna", 8.0),
            _single(1, "writing", 2, "vicuna", 6.0),
            _single(2, "math", 1, "vicuna", 3.0),  # replaced below: a retried grading
            _single(1, "writing", 1, GPT, 9.0),
            _single(1, "writing", 2, GPT, 7.0),
            _single(2, "math", 1, GPT, 10),
            _single(1, "writing", 1, "alpaca", 5.0),
            _single(2, "math", 1, "alpaca", None, error="judge output had no [[rating]]"),
            _single(2, "math", 1, "vicuna", 4.0),
        ],
    )
    pairwise = _write_jsonl(
        tmp_path / "pairwise.jsonl",
        [
            _pair(1, "vicuna", GPT, GPT),
            _pair(2, "vicuna", GPT, "inconsistent"),
            _pair(3, "vicuna", GPT, "vicuna"),  # replaced below
            _pair(4, "vicuna", GPT, None, error="HTTP 500"),
            _pair(5, GPT, "vicuna", "vicuna"),  # the same pair, listed the other way round
            _pair(1, "alpaca", "vicuna", "vicuna"),
            _pair(3, "vicuna", GPT, "tie"),
        ],
    )
    return [single, pairwise]


def test_judgments(judgments):
    report = build_report(GPT, judgments=judgments)
    assert report.kind == "judgments" and report.judges == ["gpt-4"]
    assert report.sources == [str(p) for p in judgments]
    vicuna, gpt, alpaca = (report.models[n] for n in ("vicuna", GPT, "alpaca"))
    # grades: the last record per key counts, a failed grade is no score
    assert (vicuna.overall, vicuna.n_scores) == (6.0, 3)
    assert vicuna.categories == {"math": 4.0, "writing": 7.0}
    assert vicuna.turns == {1: 6.0, 2: 6.0}
    assert gpt.overall == pytest.approx(26 / 3)
    assert (alpaca.overall, alpaca.n_scores) == (5.0, 1)
    # relative: own total over the reference's on the turns graded for both
    assert vicuna.relative == pytest.approx(18 / 26)
    assert alpaca.relative == pytest.approx(5 / 9)
    assert (gpt.relative, gpt.relative_via) == (1.0, [GPT])
    assert report.categories == ["writing", "math"]
    # games: inconsistent counts as a tie, a null winner as a failure
    assert vicuna.opponents == {
        GPT: {"wins": 1, "ties": 2, "losses": 1},
        "alpaca": {"wins": 1, "ties": 0, "losses": 0},
    }
    assert (vicuna.wins, vicuna.ties, vicuna.losses) == (2, 2, 1)
    assert vicuna.win_rate == pytest.approx(3 / 5)
    assert (gpt.wins, gpt.ties, gpt.losses, gpt.win_rate) == (1, 2, 1, 0.5)
    assert alpaca.win_rate == 0.0
    pair = next(p for p in report.pairs if {p.model_a, p.model_b} == {"vicuna", GPT})
    assert (pair.games, pair.inconsistent, pair.failures) == (4, 1, 1)
    assert pair.position_bias == 0.25
    assert (vicuna.failures, gpt.failures, alpaca.failures) == (1, 1, 1)
    assert report.failures == {"single": 1, "pairwise": 1}
    assert any("2 judgment(s) replaced" in note for note in report.notes)


def test_judgments_json_tables_and_plots(judgments, tmp_path):
    report = build_report(GPT, judgments=judgments)
    document = json.loads(write_json(report, tmp_path / "out" / "report.json").read_text())
    assert document["reference"] == GPT and document["judges"] == ["gpt-4"]
    assert list(document["models"]) == [GPT, "vicuna", "alpaca"]  # best first
    assert document["models"]["vicuna"]["relative"] == round(18 / 26, 4)
    assert document["models"]["vicuna"]["turns"] == {"1": 6.0, "2": 6.0}
    assert document["models"]["vicuna"]["win_rate"] == 0.6
    assert document["pairs"][0]["position_bias"] == 0.25
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "69.2%" in text and "turn 2" in text and "1 (25.0%)" in text
    assert [p.name for p in draw_plots(report, tmp_path / "plots")] == PLOTS


def test_pairwise_only_judgments_have_no_relative_quality(judgments):
    report = build_report(GPT, judgments=judgments[1:])
    assert all(m.relative is None for m in report.models.values())
    assert report.models["vicuna"].win_rate == pytest.approx(3 / 5)
    assert report.categories == []


def test_questions_file_gives_the_categories(judgments, tmp_path):
    questions = _write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 1, "category": "roleplay", "turns": ["a", "b"]},
            {"question_id": 2, "category": "reasoning", "turns": ["c"]},
        ],
    )
    report = build_report(GPT, judgments=judgments, questions=questions)
    assert report.models["vicuna"].categories == {"reasoning": 4.0, "roleplay": 7.0}
    assert report.questions == str(questions)
    _write_jsonl(questions, [{"question_id": 1, "category": "roleplay", "turns": ["a"]}])
    with pytest.raises(
        VicunaSkyError, match=r"single.jsonl: record 9: question 2 not in .*q.jsonl"
    ):
        build_report(GPT, judgments=judgments, questions=questions)


def test_judgments_and_legacy_reviews_are_not_mixed(judgments):
    with pytest.raises(VicunaSkyError, match="not both"):
        build_report("gpt35", judgments=judgments, legacy_reviews=BLOG)
    with pytest.raises(VicunaSkyError, match="nothing to report"):
        build_report("gpt35")


def test_blog_json_tables_and_plots(blog, tmp_path):
    document = json.loads(write_json(blog, tmp_path / "report.json").read_text())
    assert {n: m["relative"] for n, m in document["models"].items()} == {
        "gpt35": 1.0,
        "bard": 0.9326,
        "vicuna-13b": 0.9206,
        "alpaca-13b": 0.7624,
        "llama-13b": 0.6805,
    }
    assert document["kind"] == "legacy-reviews" and document["reference"] == "gpt35"
    assert document["judges"] == blog.judges and len(document["sources"]) == 4
    assert set(document["models"]["bard"]) >= {
        "relative",
        "overall",
        "categories",
        "wins",
        "ties",
        "losses",
        "win_rate",
        "failures",
    }
    summary, by_category, pairs = report_tables(blog)
    assert (summary.row_count, by_category.row_count, pairs.row_count) == (5, 9, 4)
    paths = draw_plots(blog, tmp_path / "plots")
    assert [p.name for p in paths] == PLOTS
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        with Image.open(path) as image:
            width, height = image.size
        assert width >= 900 and 300 <= height <= width
    with Image.open(paths[0]) as image:
        assert image.size == (960, round((1.6 + 0.55 * 5) * 120))


def test_bad_inputs(tmp_path):
    with pytest.raises(VicunaSkyError, match="no such review directory"):
        build_report("gpt35", legacy_reviews=tmp_path / "missing")
    with pytest.raises(VicunaSkyError, match=r"no review_<model-a>_<model-b>.jsonl files"):
        build_report("gpt35", legacy_reviews=tmp_path)
    with pytest.raises(VicunaSkyError, match=r"question.jsonl: no such question file"):
        shutil.copy(BLOG / "review_gpt35_vicuna-13b.jsonl", tmp_path)
        build_report("gpt35", legacy_reviews=tmp_path)
    with pytest.raises(VicunaSkyError, match=r"reference model 'gpt35' is not in .*alpaca-13b"):
        build_report("gpt35", legacy_reviews=REVIEWS / "others")
    with pytest.raises(VicunaSkyError, match=r"reference model 'gpt-4' is not"):
        build_report("gpt-4", legacy_reviews=BLOG)
    with pytest.raises(VicunaSkyError, match="no such file"):
        build_report("gpt35", judgments=[tmp_path / "nope.jsonl"])


def test_bad_review_files(tmp_path):
    questions = EVAL_TABLE / "question.jsonl"
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(BLOG / "review_gpt35_vicuna-13b.jsonl", odd / "review_gpt35_vicuna_13b.jsonl")
    with pytest.raises(VicunaSkyError, match=r"review_gpt35_vicuna_13b.jsonl: expected review_"):
        build_report("gpt35", legacy_reviews=odd, questions=questions)
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (BLOG / "review_gpt35_vicuna-13b.jsonl").read_text()
    (broken / "review_gpt35_vicuna-13b.jsonl").write_text(text + '{"question_id": 1, "sco\n')
    with pytest.raises(VicunaSkyError, match=r"review_gpt35_vicuna-13b.jsonl:81: not JSON"):
        build_report("gpt35", legacy_reviews=broken, questions=questions)
    _write_jsonl(broken / "review_gpt35_vicuna-13b.jsonl", [{"question_id": 1, "score": "9 8"}])
    with pytest.raises(VicunaSkyError, match=r"record 1: expected question_id and score"):
        build_report("gpt35", legacy_reviews=broken, questions=questions)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "both"}, "mode must be 'single' or 'pairwise'"),
        ({"model": None}, "a single judgment needs model"),
        ({"score": "8"}, "score must be a number or null"),
        ({"turn": "1"}, "question_id must be an integer or string, turn an integer"),
    ],
)
def test_bad_judgment_records(tmp_path, change, message):
    path = _write_jsonl(
        tmp_path / "j.jsonl", [_single(1, "x", 1, "a", 1.0), _single(1, "x", 1, "b", 1.0) | change]
    )
    with pytest.raises(VicunaSkyError, match=f"j.jsonl: record 2: {message}"):
        build_report("a", judgments=[path])


def test_bad_pairwise_winner(tmp_path):
    path = _write_jsonl(tmp_path / "j.jsonl", [_pair(1, "a", "b", "c")])
    with pytest.raises(VicunaSkyError, match="record 1: needs two different models and a winner"):
        build_report("a", judgments=[path])
