"""A model's tokenizer as GGUF keys, the way llama.cpp reads them (see gguf/export.py's docstring):
byte-level BPE (`gpt2`: tokens, merges, token types, a pre-tokenizer name llama.cpp knows) or
SentencePiece-style BPE (`llama`: tokens, scores, token types); the special token ids, whether
BOS/EOS are added (as the source tokenizer does it) and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.gguf import vocab as gguf_vocab
from vicuna_sky.inputs import read_json_object


def _is_sentencepiece_bpe(spec: dict[str, Any]) -> bool:
    """A Llama/Mistral tokenizer as transformers saves it: BPE over "▁"-joined pieces with byte
    fallback, no byte-level mapping."""
    model = spec.get("model", {})
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "BPE" and model.get("byte_fallback") and "▁" in text


def _adds(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the source tokenizer puts BOS / EOS around a text: what it does, not what a
    config says, so the GGUF's flags make llama.cpp encode prompts the same way."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    extra = len(with_special) - len(plain)
    bos = (
        extra > 0
        and tokenizer.bos_token_id is not None
        and with_special[0] == tokenizer.bos_token_id
    )
    eos = (
        extra > 0
        and tokenizer.eos_token_id is not None
        and with_special[-1] == tokenizer.eos_token_id
    )
    return bos, eos


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer keys; returns a summary (kind, pre-tokenizer, token count)."""
    import gguf
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise VicunaSkyError(
            f"no tokenizer.json in {model_dir}: GGUF export needs the model's fast tokenizer"
        )
    spec = read_json_object(model_dir / "tokenizer.json")
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise VicunaSkyError(
            f"{model_dir}: tokenizer model {model.get('type')!r} is not supported; "
            "GGUF export supports BPE tokenizers (byte-level or SentencePiece-style)"
        )
    vocab: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    vocab |= {i: a["content"] for i, a in added.items()}
    if vocab and max(vocab) >= vocab_size:
        raise VicunaSkyError(
            f"the tokenizer has ids up to {max(vocab)} but the model's vocabulary has "
            f"{vocab_size} rows"
        )
    T = gguf.TokenType
    spm = _is_sentencepiece_bpe(spec)
    pre = None if spm else gguf_vocab.identify(spec)
    if not spm and pre is None:
        raise VicunaSkyError(
            f"{model_dir}: this tokenizer splits text as none of llama.cpp's pre-tokenizers "
            f"that the export knows ({', '.join(gguf_vocab.PRE_TOKENIZERS)}) or SentencePiece-"
            "style BPE; llama.cpp would tokenize it differently"
        )
    tokens, types, scores = [], [], []
    # The rank of the first merge that makes each token: a token several merges make ("▁▁▁▁" is
    # "▁▁"+"▁▁" and "▁"+"▁▁▁") is made as soon as the first of them applies.
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", []) if spm else []):
        ranks.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), rank)
    for i in range(vocab_size):
        token = vocab.get(i)
        if token is None:  # rows the embedding has beyond the tokenizer (padding to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            scores.append(-1000.0)
            continue
        tokens.append(token)
        # SentencePiece's own kinds first: its byte pieces and <unk> are often saved as added
        # tokens too, and llama.cpp treats BYTE and UNKNOWN pieces specially.
        if spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(T.BYTE)
        elif spm and token == model.get("unk_token"):
            types.append(T.UNKNOWN)
        elif i in added:
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
        # llama.cpp's SentencePiece tokenizer merges the pair whose result scores highest;
        # -rank of the merge that makes a token reproduces the BPE's merge order (a piece no
        # merge makes, a single character, ranks last: it is never a pair's result).
        control = types[-1] in (T.CONTROL, T.USER_DEFINED)
        rank = ranks.get(token, len(ranks))
        scores.append(-1000.0 if control else -float(rank) if spm else 0.0)

    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else pre)
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=not spm, n_vocab=vocab_size)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise VicunaSkyError(f"cannot load the tokenizer in {model_dir}: {e}") from None
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds(tokenizer)
    if spm:
        normalizer = json.dumps(spec.get("normalizer"), ensure_ascii=False)
        pre_spec = spec.get("pre_tokenizer") or {}
        prefix = "Prepend" in normalizer or pre_spec.get("prepend_scheme") in ("first", "always")
        writer.add_add_space_prefix(bool(prefix))
    else:
        writer.add_add_space_prefix(False)  # byte-level BPE never adds one
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer": "llama" if spm else f"gpt2 ({pre})", "tokens": len(vocab)}
