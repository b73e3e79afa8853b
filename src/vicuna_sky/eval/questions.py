"""Benchmark questions in FastChat's formats.

- `turns` (vicuna_bench, mt_bench): `{"question_id", "category", "turns": [...], "reference"?}`
- legacy `text` (the original Vicuna eval table): `{"question_id", "category", "text"}`

Reference answers for the categories that are judged against one come either inline
(`reference`) or from an answers file in the model-answer format (`choices[0].turns`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError

DEMO = "demo"
"""The name of the small question set that ships with the package (used by the demo)."""

REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})
"""Categories a judge grades against a reference answer, when one is available."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = field(default=None)

    @property
    def key(self) -> str:
        """The id as text: answer and reference files may write 1 where the questions say "1"."""
        return str(self.question_id)

    @property
    def needs_reference(self) -> bool:
        return self.category in REFERENCE_CATEGORIES

    def reference_for(self, turn: int) -> bool:
        """Whether a reference answer covers turns 1..`turn` (else the judge goes without)."""
        return self.needs_reference and len(self.reference or []) >= turn


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a broken line is an error naming the file and line."""
    if not path.is_file():
        raise VicunaSkyError(f"{path}: no such file")
    records = []
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines(): U+2028
    except UnicodeDecodeError as e:
        raise VicunaSkyError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise VicunaSkyError(f"{path}: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_no_constant)
        except ValueError as e:
            raise VicunaSkyError(f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise VicunaSkyError(f"{path}:{number}: expected a JSON object per line")
        records.append(record)
    return records


def _no_constant(name: str) -> float:
    # NaN and Infinity are not JSON; Python's parser accepts them, and a NaN score would
    # poison every mean it enters.
    raise ValueError(f"{name} is not a JSON number")


def _question(record: dict, where: str) -> Question:
    if not isinstance(record.get("question_id"), int | str):
        raise VicunaSkyError(f"{where}: question_id must be an integer or a string")
    turns = record.get("turns")
    if turns is None and "text" in record:
        turns = [record["text"]]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise VicunaSkyError(f"{where}: expected `turns` (a list of strings) or `text`")
    reference = record.get("reference")
    if reference is not None and not (
        isinstance(reference, list) and all(isinstance(t, str) for t in reference)
    ):
        raise VicunaSkyError(f"{where}: `reference` must be a list of strings")
    return Question(record["question_id"], str(record.get("category", "general")), turns, reference)


def demo_questions_path() -> Path:
    return Path(str(resources.files("vicuna_sky.eval") / "demo_questions.jsonl"))


def load_questions(path: Path | str, reference_answers: Path | None = None) -> list[Question]:
    """Questions from a file (or `demo`), with reference answers merged in when given."""
    path = demo_questions_path() if str(path) == DEMO else Path(path)
    questions, seen = [], set()
    for number, record in enumerate(read_jsonl(path), 1):
        question = _question(record, f"{path}:{number}")
        if str(question.question_id) in seen:
            raise VicunaSkyError(f"{path}:{number}: duplicate question_id {question.question_id}")
        seen.add(str(question.question_id))
        questions.append(question)
    if not questions:
        raise VicunaSkyError(f"{path}: no questions")
    if reference_answers is not None:
        references = load_reference_answers(reference_answers)
        questions = [
            Question(q.question_id, q.category, q.turns, references.get(q.key, q.reference))
            for q in questions
        ]
    return questions


def read_answer(record: dict, where: str) -> tuple[str, str, list[str]]:
    """(model_id, question_id as text, answer turns) of a model-answer record."""
    try:
        model, qid, turns = record["model_id"], record["question_id"], record["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise VicunaSkyError(
            f"{where}: expected model_id, question_id and choices[0].turns"
        ) from None
    if not isinstance(model, str) or not isinstance(qid, int | str):
        raise VicunaSkyError(f"{where}: model_id must be a string, question_id an int or string")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise VicunaSkyError(f"{where}: choices[0].turns must be a list of strings")
    return model, str(qid), turns


def load_reference_answers(path: Path) -> dict[str, list[str]]:
    """question_id (as text) -> answer turns, from a file in the model-answer format."""
    references = {}
    for number, record in enumerate(read_jsonl(path), 1):
        record.setdefault("model_id", "reference")
        _, qid, turns = read_answer(record, f"{path}:{number}")
        references[qid] = turns
    return references
