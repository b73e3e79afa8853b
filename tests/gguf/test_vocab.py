"""The tokenizer a GGUF carries (vicuna_sky.gguf.tokenizer and gguf.vocab): SentencePiece and
byte-level vocabularies written as llama.cpp's converter writes them, pre-tokenizers named as
llama.cpp names them, and the splits llama.cpp would make otherwise refused, on export and on
import."""

import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoTokenizer

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.gguf.export import export_gguf
from vicuna_sky.gguf.load import load_gguf

from ..gguf_common import PROMPT, TEXTS, logits, same_tokens, source_model


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory) -> Path:
    """A Llama-2-style tokenizer as transformers saves one: BPE over "▁"-joined pieces, byte
    fallback (<0x00>..<0xFF>), a prepended "▁", BOS added; trained here on the demo text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vicuna_sky.tiny import _texts, demo_conversations

    out = tmp_path_factory.mktemp("spm") / "model"
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False
    )
    tok.train_from_iterator(_texts(demo_conversations()), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(out)
    config = LlamaConfig(
        vocab_size=704,  # 4 rows beyond the tokenizer, as models padded to a multiple have
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(2)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_sentencepiece_style_tokenizer(sentencepiece_llama, tmp_path):
    done = export_gguf(sentencepiece_llama, tmp_path / "spm.gguf", "f32", progress=False)
    assert done["tokenizer"] == "llama"
    fields = gguf.GGUFReader(done["path"]).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = dict(zip(tokens, fields["tokenizer.ggml.token_type"].contents(), strict=True))
    T = gguf.TokenType
    assert (types["<unk>"], types["<s>"], types["<0x41>"], types["[PAD703]"]) == (
        T.UNKNOWN,
        T.CONTROL,
        T.BYTE,
        T.UNUSED,
    )
    assert len(tokens) == 704 and fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    # transformers' GGUF reader rebuilds the merges from the scores; it does not add BOS itself
    # (llama.cpp does, from add_bos_token), so texts are compared without special tokens.
    source_tok = AutoTokenizer.from_pretrained(sentencepiece_llama)
    model, tokenizer = load_gguf(Path(done["path"]))
    for text in TEXTS:
        want = source_tok(text, add_special_tokens=False).input_ids
        assert tokenizer(text, add_special_tokens=False).input_ids == want, text
    ids = source_tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(logits(model, ids), logits(source_model(sentencepiece_llama), ids))


def _with_tokenizer(tiny: Path, root: Path, edit) -> Path:
    """A copy of the tiny model whose tokenizer.json `edit(spec)` has changed."""
    model = root / "model"
    model.mkdir()
    for path in tiny.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    spec = json.loads((model / "tokenizer.json").read_text())
    edit(spec)
    (model / "tokenizer.json").write_text(json.dumps(spec))
    return model


def _llama3_split(spec: dict) -> None:
    from vicuna_sky.gguf.vocab import LLAMA3_REGEX

    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": LLAMA3_REGEX},
                "behavior": "Isolated",
                "invert": False,
            },
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
        ],
    }
    spec["model"]["ignore_merges"] = True


def _digits_first(spec: dict) -> None:
    byte_level = spec["pre_tokenizer"]
    digits = {"type": "Digits", "individual_digits": True}
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, byte_level]}


@pytest.mark.parametrize(
    ("edit", "name"),
    [(None, "gpt-2"), (_digits_first, "smollm"), (_llama3_split, "llama-bpe")],
)
def test_pre_tokenizer_names_are_llama_cpp_s(tiny, tmp_path, edit, name):
    """The tiny tokenizer (GPT-2's byte-level split) and the same vocabulary split as SmolLM2
    and as Llama 3 get llama.cpp's names for those splits (src/llama-vocab.cpp); the export
    writes that name. SmolLM2's own name is checked above, against llama.cpp's file, and in
    tests/test_models.py against llama.cpp's fingerprint."""
    from vicuna_sky.gguf.vocab import identify

    model = tiny if edit is None else _with_tokenizer(tiny, tmp_path, edit)
    assert identify(json.loads((model / "tokenizer.json").read_text())) == name
    done = export_gguf(model, tmp_path / "x.gguf", "f32", progress=False)
    assert done["tokenizer"] == f"gpt2 ({name})"
    fields = gguf.GGUFReader(done["path"]).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == name
    # Read back, the file's tokenizer encodes as the directory's does.
    same_tokens(AutoTokenizer.from_pretrained(model), load_gguf(Path(done["path"]))[1])


def _prefix_space(spec: dict) -> None:
    spec["pre_tokenizer"]["add_prefix_space"] = True


def _whitespace(spec: dict) -> None:
    spec["pre_tokenizer"] = {"type": "Whitespace"}


def _nfkc(spec: dict) -> None:
    spec["normalizer"] = {"type": "NFKC"}


@pytest.mark.parametrize("edit", [_prefix_space, _whitespace, _nfkc])
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(tiny, tmp_path, edit):
    """A prefix space, a split no llama.cpp name makes, or a normalizer llama.cpp does not run
    (NFKC turns "½" into "1⁄2"): no name fits, so nothing is written under a wrong one."""
    model = _with_tokenizer(tiny, tmp_path, edit)
    with pytest.raises(VicunaSkyError, match=r"splits text as none of llama\.cpp's pre-tokenizers"):
        export_gguf(model, tmp_path / "x.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_import_refuses_a_pre_tokenizer_it_cannot_split_as_llama_cpp(tiny, tmp_path):
    """A GGUF whose byte-level pre-tokenizer name is not one the import knows is refused in one
    line rather than read with some other split (transformers' reader ignores the name)."""
    done = export_gguf(tiny, tmp_path / "tiny.gguf", "f32", progress=False)
    data = Path(done["path"]).read_bytes()
    name = b"tokenizer.ggml.pre"
    at = data.index(name) + len(name) + 4 + 8  # the string's type, then its length
    assert data[at : at + 5] == b"gpt-2"
    other = tmp_path / "qwen2.gguf"
    other.write_bytes(data[:at] + b"qwen2" + data[at + 5 :])
    assert gguf.GGUFReader(other).fields["tokenizer.ggml.pre"].contents() == "qwen2"
    with pytest.raises(VicunaSkyError, match="byte-level pre-tokenizer 'qwen2' is not supported"):
        load_gguf(other)


def test_a_llama_2_tokenizer_is_sentencepiece_default(tmp_path):
    """Meta's Llama-2 tokenizer (the fixture) on a small Llama: llama.cpp's converter writes
    SentencePiece vocabularies as model `llama`, pre-tokenizer `default`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fixture = Path(__file__).parents[1] / "fixtures" / "tokenizers" / "llama2"
    model = tmp_path / "llama2"
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    tokenizer.save_pretrained(model)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model)
    done = export_gguf(model, tmp_path / "llama2.gguf", "f32", progress=False)
    fields = gguf.GGUFReader(done["path"]).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "default"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
