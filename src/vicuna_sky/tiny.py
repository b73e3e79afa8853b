"""A tiny Llama with random weights and a tokenizer trained locally, for the demo and tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the demo conversations,
the model is `LlamaForCausalLM` with a few small layers, saved with `save_pretrained` in
safetensors so every loader (transformers, vLLM) reads it like a real checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

DEMO_DATA = "demo_sharegpt.json"
BUILTIN_DATA = "demo-sample"
"""A recipe's data.path naming the packaged sample (`builtin_data`): prepared on this machine
for the recipe's tokenizer, then uploaded and trained on like any user's file."""
TINY_MODEL = "tiny-llama"
"""The built-in model name: the trainer builds it locally when no such directory exists."""
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML chat template (SmolLM2's, Qwen's), for a tiny model served with `chat_template`."""


def demo_conversations() -> list[dict]:
    """The ShareGPT-format sample shipped with the package."""
    text = resources.files("vicuna_sky.assets").joinpath(DEMO_DATA).read_text()
    return json.loads(text)


def _texts(conversations: list[dict]) -> Iterator[str]:
    for conv in conversations:
        for turn in conv["conversations"]:
            yield turn["value"]


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on the demo text and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(demo_conversations()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(out_dir: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """Save a random-weight tiny Llama (and its tokenizer, with `chat_template` when given) to
    `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    build_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if chat_template:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        # head_dim 32: the smallest that every attention backend (SDPA, vLLM CPU) accepts.
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def builtin_data(
    cache: Path,
    max_length: int,
    template: str,
    tokenizer: str,
    eval_fraction: float = 0.0,
) -> tuple[Path, Path | None, dict]:
    """The packaged sample cleaned and split for these settings, made once under `cache`
    (keyed by them): (training file, held-out file or None, prepare_demo_data's counts)."""
    import hashlib
    import shutil
    import tempfile

    from vicuna_sky.data.pipeline import eval_path_for

    key = hashlib.sha256(
        json.dumps([max_length, template, str(tokenizer), eval_fraction]).encode()
    ).hexdigest()[:16]
    folder = cache / key
    target = folder / DEMO_DATA
    held = eval_path_for(target) if eval_fraction else None
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Made beside, then moved in whole: an interrupted preparation is never taken as done.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            stats = prepare_demo_data(
                Path(tmp) / DEMO_DATA, max_length, template, tokenizer, eval_fraction
            )
            (Path(tmp) / "counts.json").write_text(json.dumps(stats))
            shutil.rmtree(folder, ignore_errors=True)
            Path(tmp).rename(folder)
            Path(tmp).mkdir()  # for TemporaryDirectory's own clean-up
    return target, held, json.loads((folder / "counts.json").read_text())


def prepare_demo_data(
    target: Path,
    max_length: int,
    template: str = "vicuna_v1.1",
    tokenizer: str | None = None,
    eval_fraction: float = 0.0,
) -> dict:
    """The packaged HTML sample, cleaned and split to `max_length` tokens of `tokenizer` (a
    model directory; default: the tiny model's), written to `target` (where a recipe's data
    path points in the local bucket). With `eval_fraction`, that share of the conversations is
    held out to X.eval.json beside it. Returns counts for a summary."""
    import tempfile

    from vicuna_sky.data.clean import CleanConfig
    from vicuna_sky.data.pipeline import clean_file, eval_path_for, split_file, stats_file
    from vicuna_sky.data.split import SplitConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "sharegpt_html.json"
        raw.write_text(json.dumps(demo_conversations(), ensure_ascii=False))
        tokenizer = tokenizer or str(build_tokenizer(tmp / "tokenizer"))
        kept = clean_file(raw, tmp / "clean.json", CleanConfig(workers=1), quiet=True)
        config = SplitConfig(
            tokenizer, max_length, template, workers=1, eval_fraction=eval_fraction
        )
        held = eval_path_for(target) if eval_fraction else None
        split = split_file(tmp / "clean.json", target, config, quiet=True, eval_dst=held)
        stats = stats_file(target, tokenizer, template, max_length)
    return {
        "conversations": len(demo_conversations()),
        "kept": len(kept.samples),
        "removed": {r: n for r, n in kept.counts.items() if r != "kept" and n},
        "segments": len(split.samples),
        "held_out": split.counts["conversations_held_out"],
        "held_out_segments": len(split.held_out),
        "tokens": stats.tokens,
        "trainable_tokens": stats.trainable_tokens,
    }
