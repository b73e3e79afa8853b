"""The evaluation report: mean scores by category, win/tie/loss, quality relative to a reference.

One report reads one kind of evidence, never both (they differ in judge prompts and model names):
our judgment JSONL (single-answer grades give scores, pairwise verdicts win/tie/loss), or FastChat's
legacy review directory (`review_<a>_<b>.jsonl`, GPT-4 scores `[s_a, s_b]` for two answers).
Relative quality is total(model) / total(reference) over the items both were scored on, chained
through other models where there is no direct comparison: the Vicuna blog reviewed every model
against vicuna-13b and vicuna-13b against ChatGPT; this reproduces its "% of ChatGPT quality".
`plots.py` shows a report: terminal tables, JSON, PNG figures."""

from __future__ import annotations

import math
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import NamedTuple

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.questions import load_questions, read_jsonl

TIE, INCONSISTENT = "tie", "inconsistent"


class Score(NamedTuple):
    """One grade of one answer turn (a legacy review gives one to each of its two answers)."""

    model: str
    judge: str
    question_id: int | str
    turn: int
    category: str
    score: float


@dataclass
class PairSummary:
    """Games between two models. `inconsistent` ones (the verdict flipped with the answer order)
    count as ties and are reported as position bias. Totals: the legacy reviews' score sums."""

    model_a: str
    model_b: str
    wins_a: int = 0
    wins_b: int = 0
    ties: int = 0
    inconsistent: int = 0
    failures: int = 0
    total_a: float | None = None
    total_b: float | None = None

    @property
    def games(self) -> int:
        return self.wins_a + self.wins_b + self.ties

    @property
    def position_bias(self) -> float | None:
        return self.inconsistent / self.games if self.games else None

    def add(self, winner: str | None) -> None:
        """Count one verdict: a model's name, tie, inconsistent, or None for a failure."""
        self.failures += winner is None
        self.wins_a += winner == self.model_a
        self.wins_b += winner == self.model_b
        self.ties += winner in (TIE, INCONSISTENT)
        self.inconsistent += winner == INCONSISTENT


@dataclass
class ModelSummary:
    """One model's results. A model reviewed in several legacy pair files (vicuna-13b in all four of
    the blog's) gets category and overall means over all of its reviews, whoever the opponent."""

    relative: float | None
    relative_via: list[str] | None  # the chain of models it was computed along, to the reference
    relative_note: str | None  # why it is null
    overall: float | None
    n_scores: int
    turns: dict[int, float]
    categories: dict[str, float]
    judges: list[str]
    failures: int
    wins: int = 0
    ties: int = 0
    losses: int = 0
    opponents: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> wins/ties/losses

    @property
    def win_rate(self) -> float | None:
        """(wins + ties / 2) / games"""
        games = self.wins + self.ties + self.losses
        return (self.wins + self.ties / 2) / games if games else None

    def add_games(self, opponent: str, wins: int, ties: int, losses: int, failed: int) -> None:
        self.opponents[opponent] = {"wins": wins, "ties": ties, "losses": losses}
        self.wins, self.ties, self.losses = self.wins + wins, self.ties + ties, self.losses + losses
        self.failures += failed


@dataclass
class Report:
    kind: str  # "judgments" (ours) or "legacy-reviews" (FastChat's review directory)
    reference: str
    judges: list[str]  # every judge model (legacy: reviewer_id) with verdicts in the report
    sources: list[str]
    questions: str | None
    categories: list[str]
    models: dict[str, ModelSummary]
    pairs: list[PairSummary]
    failures: dict[str, int]
    notes: list[str]


def build_report(
    reference: str,
    *,
    judgments: Sequence[Path | str] = (),
    legacy_reviews: Path | str | None = None,
    questions: Path | str | None = None,
) -> Report:
    """The report for our judgment files or (not both) a legacy review directory. `questions` gives
    categories (default: judgments carry theirs; reviews use question.jsonl two levels up)."""
    if judgments and legacy_reviews is not None:
        raise VicunaSkyError(
            "give judgment files or a legacy review directory, not both: they were judged on "
            "different scales and name models differently; make one report for each"
        )
    questions = None if questions is None else Path(questions)
    if legacy_reviews is not None:
        return _summarize(_read_reviews(Path(legacy_reviews), questions), reference)
    if judgments:
        return _summarize(_read_judgments(list(map(Path, judgments)), questions), reference)
    raise VicunaSkyError("nothing to report: give judgment files or a legacy review directory")


@dataclass
class _Evidence:
    """What a source yields: grades, games per model pair, failed grades, and who judged."""

    kind: str
    sources: list[str]
    questions: Path | None
    scores: list[Score] = field(default_factory=list)
    pairs: dict[frozenset[str], PairSummary] = field(default_factory=dict)
    failed_grades: Counter[str] = field(default_factory=Counter)
    judges: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        questions = load_questions(self.questions) if self.questions else []
        self.categories = {q.question_id: q.category for q in questions}

    def grade(self, r: dict, model: str, turn: int, score: float, judge: str, where: str) -> None:
        category = str(r.get("category") or "uncategorized")
        if self.questions and (category := self.categories.get(r["question_id"])) is None:
            raise VicunaSkyError(f"{where}: question {r['question_id']!r} not in {self.questions}")
        self.scores.append(Score(model, judge, r["question_id"], turn, category, float(score)))
        self.judges.add(judge)

    def pair(self, a: str, b: str) -> PairSummary:  # one per pair of models, in either order
        return self.pairs.setdefault(frozenset((a, b)), PairSummary(a, b))


def _judgment_key(r: dict, where: str) -> tuple:
    """The identity of a judgment (a later one with the same key replaces it), after checks."""
    names = {"single": ("model",), "pairwise": ("model_a", "model_b")}.get(r.get("mode"))
    if names is None:
        raise VicunaSkyError(f"{where}: mode must be 'single' or 'pairwise', not {r.get('mode')!r}")
    if missing := [f for f in ("question_id", "judge", *names) if r.get(f) is None]:
        raise VicunaSkyError(f"{where}: a {r['mode']} judgment needs {', '.join(missing)}")
    if not isinstance(r["question_id"], int | str) or not isinstance(r.setdefault("turn", 1), int):
        raise VicunaSkyError(f"{where}: question_id must be an integer or string, turn an integer")
    if not all(isinstance(r[f], str) for f in ("judge", *names)):
        raise VicunaSkyError(f"{where}: {', '.join(('judge', *names))} must be strings (names)")
    score = r.get("score")
    if r["mode"] == "single" and not (score is None or _finite(score)):
        raise VicunaSkyError(f"{where}: score must be a number or null, not {score!r}")
    winners = (None, TIE, INCONSISTENT, r.get("model_a"), r.get("model_b"))
    if r["mode"] == "pairwise" and (r["model_a"] == r["model_b"] or r.get("winner") not in winners):
        raise VicunaSkyError(
            f"{where}: needs two different models and a winner: one of them, tie, inconsistent"
        )
    # A pair is the same comparison in either order (resumed runs may list the files reversed).
    models = sorted(r[f] for f in names)
    return (r["mode"], str(r["question_id"]), r["turn"], r["judge"], *models)


def _finite(x: object) -> bool:
    """A JSON number that means one: 1e999 parses to inf, and true is not a score."""
    return type(x) in (int, float) and math.isfinite(x)


def _read_judgments(paths: list[Path], questions: Path | None) -> _Evidence:
    records = [(f"{p}: record {n}", r) for p in paths for n, r in enumerate(read_jsonl(p), 1)]
    latest = {_judgment_key(r, where): (where, r) for where, r in records}  # the last one wins
    ev = _Evidence("judgments", list(map(str, paths)), questions)
    if n := len(records) - len(latest):
        ev.notes.append(f"{n} judgment(s) replaced by later ones with the same key (resumed runs)")
    for where, r in latest.values():
        failed, judge = r.get("error") is not None, str(r["judge"])
        ev.judges.add(judge)
        if r["mode"] == "pairwise":
            ev.pair(r["model_a"], r["model_b"]).add(None if failed else r.get("winner"))
        elif failed or r.get("score") is None:
            ev.failed_grades[r["model"]] += 1
        else:
            ev.grade(r, r["model"], r["turn"], r["score"], judge, where)
    return ev


def _read_reviews(directory: Path, questions: Path | None) -> _Evidence:
    if not directory.is_dir():
        raise VicunaSkyError(f"{directory}: no such review directory")
    if not (files := sorted(directory.glob("review_*.jsonl"))):
        raise VicunaSkyError(f"{directory}: no review_<model-a>_<model-b>.jsonl files")
    questions = questions or directory.parent.parent / "question.jsonl"
    if not questions.is_file():
        raise VicunaSkyError(f"{questions}: no such question file (for the categories)")
    ev = _Evidence("legacy-reviews", list(map(str, files)), questions)
    for path in files:
        names = path.stem.removeprefix("review_").split("_")
        if len(names) != 2 or not all(names):
            raise VicunaSkyError(f"{path}: expected review_<a>_<b>.jsonl, no _ in a model name")
        reviews: dict[int | str, tuple[str, dict]] = {}  # the last review of a question counts
        for n, r in enumerate(read_jsonl(path), 1):
            s = r.get("score")
            ok = isinstance(s, list) and len(s) == 2 and all(_finite(x) for x in s)
            if not ok or not isinstance(r.get("question_id"), int | str):
                raise VicunaSkyError(f"{path}: record {n}: expected question_id and score [s1, s2]")
            reviews[r["question_id"]] = (f"{path}: record {n}", r)
        (a, b), pair = names, ev.pair(*names)
        flip = pair.model_a != a  # review_b_a after review_a_b: the same pair, the other order
        for where, r in reviews.values():
            s_a, s_b = r["score"]
            if s_a < 0 or s_b < 0:  # FastChat wrote [-1, -1] for a review it could not parse
                pair.add(None)
                continue
            judge = r.get("reviewer_id")  # some directories have bare numbers here
            judge = judge if isinstance(judge, str) else f"reviewer_id {judge}"
            ev.grade(r, a, 1, s_a, judge, where)
            ev.grade(r, b, 1, s_b, judge, where)
            pair.add(a if s_a > s_b else b if s_b > s_a else TIE)
            pair.total_a = (pair.total_a or 0.0) + (s_b if flip else s_a)
            pair.total_b = (pair.total_b or 0.0) + (s_a if flip else s_b)
    return ev


def _ratios(ev: _Evidence) -> dict[tuple[str, str], float]:
    """total(x) / total(y) for models scored on the same items: a legacy pair file's reviews, or
    the (judge, question, turn)s both were graded on."""
    totals = {(p.model_a, p.model_b): (p.total_a, p.total_b) for p in ev.pairs.values()}
    if ev.kind == "judgments":
        graded: dict[str, dict[tuple, float]] = defaultdict(dict)
        for s in ev.scores:
            graded[s.model][s.judge, s.question_id, s.turn] = s.score
        for x, y in combinations(sorted(graded), 2):
            common = graded[x].keys() & graded[y].keys()
            totals[x, y] = sum(graded[x][k] for k in common), sum(graded[y][k] for k in common)
    ratios = {(x, y): tx / ty for (x, y), (tx, ty) in totals.items() if tx and ty}
    return ratios | {(y, x): 1 / r for (x, y), r in ratios.items()}


def _relative(ev: _Evidence, reference: str) -> dict[str, tuple]:
    """name -> (relative, via, note): the product of ratios along the model's shortest chain to the
    reference (a direct comparison when there is one). Breadth first from the reference, neighbours
    by name, so a tie between chains always resolves the same way."""
    ratios = _ratios(ev)
    out: dict = defaultdict(lambda: (None, None, f"nothing links its scores to {reference}'s"))
    if any(x == reference for x, _ in ratios) or any(s.model == reference for s in ev.scores):
        out[reference] = (1.0, [reference], None)
    queue = deque(out)
    while queue:
        x = queue.popleft()
        for y in sorted(y for (x_, y) in ratios if x_ == x and y not in out):
            out[y] = (ratios[y, x] * out[x][0], [y, *out[x][1]], None)
            queue.append(y)
    return out


def _means(scores: list[Score], key: str) -> dict:
    keys = sorted({getattr(s, key) for s in scores})
    return {k: fmean(s.score for s in scores if getattr(s, key) == k) for k in keys}


def _summarize(ev: _Evidence, reference: str) -> Report:
    names = {s.model for s in ev.scores} | set(ev.failed_grades) | {m for k in ev.pairs for m in k}
    by_model = {name: [s for s in ev.scores if s.model == name] for name in sorted(names)}
    if reference not in names:
        models = ", ".join(sorted(names)) or "none"
        raise VicunaSkyError(f"reference model {reference!r} is not in the {ev.kind} ({models})")
    pairs = list(ev.pairs.values())
    relative = _relative(ev, reference)
    models = {}
    for name, scores in by_model.items():
        overall = fmean(s.score for s in scores) if scores else None
        turns, categories = _means(scores, "turn"), _means(scores, "category")
        judges = sorted({s.judge for s in scores})
        models[name] = ModelSummary(
            *relative[name], overall, len(scores), turns, categories, judges, ev.failed_grades[name]
        )
    for p in ev.pairs.values():
        models[p.model_a].add_games(p.model_b, p.wins_a, p.ties, p.wins_b, p.failures)
        models[p.model_b].add_games(p.model_a, p.wins_b, p.ties, p.wins_a, p.failures)
    failures = {"single": ev.failed_grades.total(), "pairwise": sum(p.failures for p in pairs)}
    categories = list(dict.fromkeys(s.category for s in ev.scores))
    questions, judges = ev.questions and str(ev.questions), sorted(ev.judges)
    head = (ev.kind, reference, judges, ev.sources, questions, categories)
    return Report(*head, models, pairs, failures, ev.notes)
