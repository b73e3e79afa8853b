"""Language identification for the `--lang` filter, with lingua (offline, no model download)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from vicuna_sky.errors import VicunaSkyError

SAMPLE_CHARS = 2000
"""Enough text to decide reliably; whole conversations would cost time and say no more."""


def check_code(code: str) -> None:
    from lingua import IsoCode639_1

    try:
        IsoCode639_1.from_str(code)
    except ValueError:
        raise VicunaSkyError(
            f"unknown language code {code!r}; use an ISO 639-1 code such as en, de, zh"
        ) from None


@functools.cache
def _detector():  # lingua is imported lazily: its type stays unnamed here
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def detect(text: str) -> str | None:
    """ISO 639-1 code of the text's language (lowercase), or None when undecided."""
    found = _detector().detect_language_of(text[:SAMPLE_CHARS])
    return found.iso_code_639_1.name.lower() if found else None


def is_language(turns: Sequence[dict], code: str) -> bool:
    """Judged on the first question and answer, where the conversation's language is set."""
    text = "\n".join(t["value"] for t in turns[:2])
    return detect(text) == code.lower()
