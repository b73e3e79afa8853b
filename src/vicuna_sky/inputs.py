"""Reading the files a user points us at (a model's config, index and tokenizer): a file that
cannot be read, or holds something else, is one line naming it, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vicuna_sky.errors import VicunaSkyError


def read_json_object(path: Path, *nested: str) -> dict[str, Any]:
    """A JSON object from `path`; the keys in `nested` must hold objects too when present."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VicunaSkyError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k, {}), dict) for k in nested):
        raise VicunaSkyError(f"{path}: not the JSON object expected here")
    return data
