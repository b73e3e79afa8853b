"""What the GGUF tests share: texts every tokenizer must encode alike, and logits."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

TEXTS = [
    "Hello world!",
    "What is the capital of France? The capital of France is Paris.",
    "  two spaces,\ttabs\nand\n\nnew lines   ",
    "digits 12345, 3.14159 and 1,000,000",
    "émigré naïve façade — “quotes” 🦙 日本語",
    "def f(x):\n    return x ** 2  # square\n",
    "<s>special</s> <unk> tokens as text",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "",
]
PROMPT = " ".join(TEXTS[:6])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits[0]


def source_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def same_tokens(source_tok, gguf_tok) -> None:
    for text in TEXTS:
        for special in (False, True):
            want = source_tok(text, add_special_tokens=special).input_ids
            got = gguf_tok(text, add_special_tokens=special).input_ids
            assert got == want, (text, special)
