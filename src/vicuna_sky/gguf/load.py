"""A GGUF model (llama.cpp's format) as a plain Hugging Face directory in safetensors.

transformers reads GGUF files (dequantizing every tensor to float32) but a model loaded that way
refuses `save_pretrained`; its weights are copied into a fresh model of the same config, which
saves like any other.

A byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`) is rebuilt from the file's tokens,
merges and pre-tokenizer name as llama.cpp runs it (`gguf.vocab`), not taken from transformers'
GGUF reader: that reader ignores the name, so SmolLM2 (`smollm`) lost its digit splitting and
tokenized differently from the original wherever two spaces come before a digit. A name this
project does not know is refused rather than guessed. The special tokens come from the file's
own metadata too: transformers' reader names the wrong end-of-sequence token (SmolLM2 gets
<|im_start|> for both BOS and EOS), which would make generation never stop at the end of a turn.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError

SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def special_token_ids(reader: object) -> dict[str, int]:
    """The special tokens' ids as the GGUF (a `gguf.GGUFReader`) records them (keys as
    transformers names them)."""
    fields = reader.fields
    return {name: int(fields[key].contents()) for name, key in SPECIAL_IDS.items() if key in fields}


_READER_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_reader(gguf_file: Path) -> Iterator[object]:
    """Parse the GGUF once for the whole load. transformers opens a fresh `gguf.GGUFReader` for
    the config, the tokenizer and the weights (four times), and a reader parses every metadata
    array element by element: about 4 s each for SmolLM2's 49K tokens and merges. It also builds
    the tensor-name map once per module of the model (400 times, 5 s). While this is open, a
    reader asked for the same file is the one already made and a name map asked for again is
    the one already built (both are only read)."""
    import gguf

    with _READER_LOCK:
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        reader = real_reader(gguf_file)
        target = Path(gguf_file).resolve()

        def shared(path: object, *args: object, **kwargs: object) -> object:
            if not args and not kwargs and Path(path).resolve() == target:
                return reader
            return real_reader(path, *args, **kwargs)

        gguf.GGUFReader, gguf.get_tensor_name_map = shared, functools.cache(real_map)
        try:
            yield reader
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


@contextlib.contextmanager
def _no_tqdm_bars() -> Iterator[None]:
    """transformers' GGUF reader draws a plain tqdm bar on stderr, which its own switch
    (disable_progress_bar) does not reach; failures still come as exceptions."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def load_gguf(gguf_file: Path) -> tuple[object, object]:
    """(model in float32, tokenizer with the GGUF's special tokens), as transformers loads them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with _no_tqdm_bars(), _one_reader(gguf_file) as reader:
            if _field(reader, "tokenizer.ggml.model") == "gpt2":
                tokenizer = byte_level_tokenizer(reader, gguf_file)
            else:
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
            special = special_token_ids(reader)
    except (OSError, ValueError) as e:
        raise VicunaSkyError(f"cannot read {gguf_file}: {str(e).splitlines()[0]}") from None
    for attr, token_id in special.items():
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    # A byte-level BPE decodes exactly; the WordPiece clean-up would eat spaces before commas.
    tokenizer.clean_up_tokenization_spaces = False
    return model, tokenizer


def _field(reader: object, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def byte_level_tokenizer(reader: object, gguf_file: Path) -> object:
    """The GGUF's byte-level BPE tokenizer as a transformers tokenizer that splits and encodes
    as llama.cpp does on the same file (its pre-tokenizer name, added tokens, BOS/EOS flags and
    chat template)."""
    from gguf import TokenType
    from transformers import PreTrainedTokenizerFast

    from vicuna_sky.gguf import vocab as gguf_vocab

    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in gguf_vocab.PRE_TOKENIZERS:
        known = ", ".join(gguf_vocab.PRE_TOKENIZERS)
        raise VicunaSkyError(
            f"{gguf_file}: byte-level pre-tokenizer {pre!r} is not supported (supported: "
            f"{known}); its text would not be split as llama.cpp splits it"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = [m.split(" ", 1) for m in _field(reader, "tokenizer.ggml.merges") or []]
    vocab = {token: i for i, token in enumerate(tokens)}
    # Control and user-defined tokens are matched whole before any splitting, in llama.cpp as
    # in an added-tokens list; control ones are special (dropped when decoding for display).
    added = [
        {"content": token, "special": kind == TokenType.CONTROL}
        for token, kind in zip(tokens, types, strict=True)
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ]
    special = special_token_ids(reader)
    names = {attr: tokens[i] for attr, i in special.items() if 0 <= i < len(tokens)}
    backend = gguf_vocab.byte_level_tokenizer(
        vocab,
        merges,
        pre,
        added,
        bos=names.get("bos_token") if _field(reader, "tokenizer.ggml.add_bos_token") else None,
        eos=names.get("eos_token") if _field(reader, "tokenizer.ggml.add_eos_token") else None,
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = str(template)
    return tokenizer


def gguf_to_safetensors(
    gguf_file: Path, out_dir: Path, extra: dict[str, str] | None = None
) -> Path:
    """Write `gguf_file` to `out_dir` as safetensors + config + tokenizer (+ `extra` files)."""
    return save_loaded(*load_gguf(gguf_file), out_dir, extra)


def save_loaded(
    loaded: object, tokenizer: object, out_dir: Path, extra: dict[str, str] | None = None
) -> Path:
    """A GGUF-loaded model and its tokenizer, saved as a plain model directory (written whole in
    a temporary directory beside `out_dir`, then renamed: a kill never leaves half a model).
    `extra` maps file names to texts written into it too, so they appear with the model."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    # The quantization entry describes the GGUF file, not the float32 weights written here.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("bos_token", "eos_token", "pad_token"):
        setattr(config, f"{attr}_id", getattr(tokenizer, f"{attr}_id"))
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise VicunaSkyError(f"the GGUF tensors do not match {type(fresh).__name__}")
    fresh.generation_config.bos_token_id = config.bos_token_id
    fresh.generation_config.eos_token_id = config.eos_token_id
    fresh.generation_config.pad_token_id = config.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for name, text in (extra or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        _readable(staging)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _readable(folder: Path) -> None:
    """mkdtemp's folder (and some writers' files) are private; a model is not."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
