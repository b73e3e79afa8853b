"""ShareGPT JSON: reading, checking and writing conversations without losing good samples.

A file is a JSON list of samples `{"id": str, "conversations": [{"from": role, "value": str}]}`
with roles `human`, `gpt` and an optional leading `system`. One malformed sample is reported by
id and field and skipped; the rest of the file still goes through.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.output import writing

HUMAN, GPT, SYSTEM = "human", "gpt", "system"
ROLES = (HUMAN, GPT, SYSTEM)


@dataclass(frozen=True)
class Problem:
    """Why one sample was skipped: which sample, which field, what was wrong."""

    sample: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"sample {self.sample}: {self.field}: {self.message}"


@dataclass
class Report:
    """What a data stage produced: samples out, a count per rule, and what it skipped."""

    samples: list[dict]
    counts: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    """Malformed input and samples the stage could not process, by id and field."""
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """(id, rule) of every well-formed sample a filter left out, in input order."""
    held_out: list[dict] = field(default_factory=list)
    """Samples set aside for evaluation (split with a held-out share), never trained on."""


def _label(raw: Any, index: int) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("id"), str | int):
        return repr(str(raw["id"]))
    return f"#{index}"


def _type_name(value: object) -> str:
    return type(value).__name__


def check_sample(raw: Any, index: int) -> Problem | None:
    """The first thing wrong with one sample, or None when its shape is right."""
    label = _label(raw, index)
    if not isinstance(raw, dict):
        return Problem(label, "sample", f"expected an object, got {_type_name(raw)}")
    if "id" not in raw:
        return Problem(label, "id", "missing")
    if not isinstance(raw["id"], str | int) or isinstance(raw["id"], bool):
        return Problem(label, "id", f"expected a string, got {_type_name(raw['id'])}")
    turns = raw.get("conversations")
    if turns is None:
        return Problem(label, "conversations", "missing")
    if not isinstance(turns, list):
        return Problem(label, "conversations", f"expected a list, got {_type_name(turns)}")
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            return Problem(label, where, f"expected an object, got {_type_name(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                return Problem(label, f"{where}.{key}", "missing")
            if not isinstance(turn[key], str):
                return Problem(
                    label, f"{where}.{key}", f"expected a string, got {_type_name(turn[key])}"
                )
        if turn["from"] not in ROLES:
            return Problem(
                label, f"{where}.from", f"unknown role {turn['from']!r} (expected {ROLES})"
            )
    return None


def load(path: Path) -> tuple[list[dict], list[Problem]]:
    """Read a ShareGPT file: the well-formed samples (ids as strings) and the problems."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise VicunaSkyError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise VicunaSkyError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise VicunaSkyError(
            f"{path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    if not isinstance(raw, list):
        raise VicunaSkyError(f"{path}: expected a JSON list of samples, got {_type_name(raw)}")
    samples, problems = [], []
    for index, item in enumerate(raw):
        problem = check_sample(item, index)
        if problem:
            problems.append(problem)
        else:
            samples.append({**item, "id": str(item["id"])})
    return samples, problems


def write(samples: list[dict], path: Path) -> None:
    """Write atomically, with ordinary permissions: a crash mid-write never leaves a truncated
    file (or input) behind, and a kill's temporary is removed by the next write."""
    with writing(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as f:
        json.dump(samples, f, indent=2, ensure_ascii=False)
        f.write("\n")
