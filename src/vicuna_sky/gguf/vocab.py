"""Byte-level BPE tokenizers as llama.cpp runs them, shared by the GGUF import and export.

A GGUF file stores a byte-level BPE tokenizer as its tokens, merges and a pre-tokenizer *name*
(`tokenizer.ggml.pre`): llama.cpp keeps a fixed list of names, each with its own split rules
(`src/llama-vocab.cpp`), and refuses a file whose name it does not know. Its converter picks the
name by fingerprinting the token ids of one check text, which only identifies vocabularies it
has seen. Here the name is chosen by behaviour instead, which also covers a vocabulary nobody
has registered (a fine-tune's, our tiny test tokenizer): for each name in `PRE_TOKENIZERS` a
tokenizer is rebuilt from the model's own vocabulary and merges with that name's rules, and the
name is the one whose rebuilt tokenizer splits and encodes a set of probe texts exactly as the
model's tokenizer does. No match means no name: the export refuses rather than write a file
that llama.cpp would tokenize differently.

The same rebuild turns a GGUF's tokens, merges and name back into a tokenizer on import, so a
model directory made from a GGUF tokenizes as llama.cpp does on that file (transformers' own
GGUF reader drops SmolLM2's digit splitting), and exporting it again writes the same name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
    "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
"""Meta Llama 3's split pattern, as its tokenizer.json gives it (llama.cpp's `llama-bpe`)."""

PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    # GPT-2's regex alone (llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2).
    "gpt-2": {"steps": [("byte_level", True)], "ignore_merges": False},
    # Every digit on its own, then GPT-2's regex (SmolLM and SmolLM2; PRE_TYPE_SMOLLM).
    "smollm": {"steps": [("digits",), ("byte_level", True)], "ignore_merges": False},
    # Llama 3's regex, then the byte mapping alone; whole words in the vocabulary skip the merges
    # (PRE_TYPE_LLAMA3, which llama.cpp runs with ignore_merges).
    "llama-bpe": {
        "steps": [("split", LLAMA3_REGEX), ("byte_level", False)],
        "ignore_merges": True,
    },
}
"""The llama.cpp pre-tokenizer names this project reads and writes, with the Hugging Face
pre-tokenizer steps that split text the same way."""

CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
"""The text llama.cpp's converter fingerprints tokenizers with (`get_vocab_base_pre`): runs of
whitespace, emoji, digits, Khmer, Chinese, Cyrillic, punctuation runs and contractions."""

PROBES = (
    CHECK_TEXT,
    # Where digit splitting shows: two or more spaces before a digit, code, tables.
    "data = [\n    10,\n    200,\n]\nRow:  7  8  9\n\t\t42\t 3.14159  -1e-10  x1y22z333",
    "def f(x):\n    return x ** 2  # square\r\n\r\n        pass   \n",
    "I'VE been told HE'S there; they'D've, you'LL see. It's 1999's best.",
    "émigré naïve façade — “quotes” 🦙 日本語 ١٢٣ ٤٥ ½ ² Ⅻ 12345678901234567890",
    "   leading, trailing and inner   spaces   \n\n\n  ",
    "<|im_start|>user\nHi!<|im_end|>\n<s>[INST] x [/INST]</s>",
)
"""Texts on which the known pre-tokenizers split differently from one another."""


def pre_tokenizer(name: str) -> Any:
    """The Hugging Face pre-tokenizer that splits as llama.cpp's `name` does."""
    from tokenizers import Regex, pre_tokenizers

    steps = []
    for step in PRE_TOKENIZERS[name]["steps"]:
        if step[0] == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif step[0] == "split":
            steps.append(pre_tokenizers.Split(Regex(step[1]), behavior="isolated", invert=False))
        else:
            byte_level = pre_tokenizers.ByteLevel(
                add_prefix_space=False, trim_offsets=True, use_regex=step[1]
            )
            steps.append(byte_level)
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def byte_level_tokenizer(
    vocab: dict[str, int],
    merges: Iterable[tuple[str, str]],
    name: str,
    added: Iterable[dict[str, Any]] = (),
    *,
    bos: str | None = None,
    eos: str | None = None,
) -> Any:
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary split by llama.cpp's `name`.
    `added` are the added tokens (`content`, `special`), matched before any splitting as
    llama.cpp matches its control and user-defined tokens; `bos` / `eos`, when given, are put
    around every encoded text (llama.cpp's add_bos_token / add_eos_token)."""
    from tokenizers import Tokenizer, decoders, models, processors

    model = models.BPE(
        vocab=dict(vocab),
        merges=[tuple(m) for m in merges],
        ignore_merges=PRE_TOKENIZERS[name]["ignore_merges"],
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer(name)
    tok.decoder = decoders.ByteLevel()
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos or eos:
        ends = [t for t in (bos, eos) if t]
        single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
        pair = single + " " + single.replace("$A", "$B:1")
        steps.append(
            processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in ends]
            )
        )
    tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    added = list(added)
    tok.add_special_tokens([_added(a) for a in added if a["special"]])
    tok.add_tokens([_added(a) for a in added if not a["special"]])
    return tok


def _added(token: dict[str, Any]) -> Any:
    from tokenizers import AddedToken

    return AddedToken(token["content"], special=token["special"], normalized=False)


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """tokenizer.json writes merges as "a b" (older files) or ["a", "b"]."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _pieces(pre: Any, text: str) -> list[str] | None:
    return None if pre is None else [piece for piece, _ in pre.pre_tokenize_str(text)]


def identify(spec: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for the byte-level BPE tokenizer `spec` (a parsed
    tokenizer.json), or None when none of PRE_TOKENIZERS behaves as it does on every probe.
    A name must split the probes into the same pieces (vocabulary aside) and then give the
    same token ids (normalizer, merges and special tokens included)."""
    from tokenizers import Tokenizer

    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None
    try:
        own = Tokenizer.from_str(json.dumps(spec))
    except Exception:  # a tokenizer.json the tokenizers library cannot read: nothing to match
        return None
    added = [
        {"content": a["content"], "special": bool(a.get("special"))}
        for a in spec.get("added_tokens", [])
    ]
    for name in PRE_TOKENIZERS:
        reference = pre_tokenizer(name)
        if any(_pieces(own.pre_tokenizer, t) != _pieces(reference, t) for t in PROBES):
            continue
        rebuilt = byte_level_tokenizer(model["vocab"], _merge_pairs(model["merges"]), name, added)
        if all(
            own.encode(t, add_special_tokens=False).ids
            == rebuilt.encode(t, add_special_tokens=False).ids
            for t in PROBES
        ):
            return name
    return None
