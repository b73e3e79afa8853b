"""GGUF exports in llama.cpp itself (opt-in): every export type of SmolLM2, of the tiny Llama
(a byte-level vocabulary nobody registered) and of a small Llama on Meta's Llama-2 tokenizer
(SentencePiece) is loaded by llama-cpp-python, built from its sdist in a venv of its own, and
compared with transformers on the model directory it came from:

- the file loads with no warning or error in llama.cpp's log;
- llama.cpp's token ids equal the directory tokenizer's on code, numbers, tables, many scripts
  and chat-template texts, and, for SmolLM2, llama.cpp's own ids on the original GGUF;
- logits agree within BOUND (max |difference| / max |logit| over a prompt) and the next token
  agrees at TOP1 of the positions; f32 runs with an f32 KV cache (llama.cpp's default cache is
  f16, which alone costs about 5e-4), so greedy generation must be identical there;
- `create_chat_completion` renders the stored template token for token as
  `apply_chat_template`, and stops at the end-of-turn token.

Run with `make test-llama-cpp` (builds .venv-llama-cpp once, 5 minutes on 2 cores), or set
VICUNA_SKY_LLAMA_CPP_PYTHON to a python that has llama_cpp. The llama.cpp side runs in
tests/llama_cpp_probe.py under that python.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vicuna_sky.gguf.export import TYPES, export_gguf
from vicuna_sky.models import SMOLLM2, build, smollm2_gguf
from vicuna_sky.tiny import build_tiny_llama

# Not resolved: a venv's python is a symlink to the base interpreter, outside the venv.
_python = os.environ.get("VICUNA_SKY_LLAMA_CPP_PYTHON", "")
LLAMA_CPP_PYTHON = os.path.abspath(_python) if _python else ""
PROBE = Path(__file__).parent / "llama_cpp_probe.py"
FIXTURE = Path(__file__).parent / "fixtures" / "llama_cpp" / "smollm2_token_ids.json"
LLAMA2_TOKENIZER = Path(__file__).parent / "fixtures" / "tokenizers" / "llama2"


def _skip_reason() -> str | None:
    if not LLAMA_CPP_PYTHON:
        return "opt-in: set VICUNA_SKY_LLAMA_CPP_PYTHON to a python with llama_cpp (see make)"
    if not os.access(LLAMA_CPP_PYTHON, os.X_OK):
        return f"VICUNA_SKY_LLAMA_CPP_PYTHON={LLAMA_CPP_PYTHON} is not an executable"
    if subprocess.run([LLAMA_CPP_PYTHON, "-c", "import llama_cpp"], capture_output=True).returncode:
        return f"{LLAMA_CPP_PYTHON} cannot import llama_cpp (make llama-cpp)"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

CASES = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
TEXTS = [case["text"] for case in CASES]
PROMPT = (
    "Spot instances cost less, but the cloud may take them back at any time. "
    "def f(x):\n    return x ** 2  # square\nRow:  7  8  9 | 3.14159 | 1,000,000\n"
    "The capital of France is"
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_TOKENS = 32
BOUND = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 8e-2}
TOP1 = {"f32": 1.0, "f16": 0.95, "bf16": 0.9, "q8_0": 0.85}
STOPS = ("f32", "f16", "bf16")
"""Types whose SmolLM2 chat answer must end at <|im_end|>. At q8_0 llama.cpp also quantizes the
activations (logit error about 6e-2, like the original Q4_1 file's), and the 135M model's
greedy answer drifts into a loop, as it does from the original file."""
MODELS = ("smollm2", "tiny", "llama2")


def _llama2_model(out: Path) -> Path:
    """A small random Llama on Meta's Llama-2 tokenizer (the fixture): SentencePiece in GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-cpp")
    return {
        "smollm2": build(SMOLLM2, root / SMOLLM2),
        "tiny": build_tiny_llama(root / "tiny"),
        "llama2": _llama2_model(root / "llama2"),
    }


@pytest.fixture(scope="module")
def reference(sources) -> dict[str, dict]:
    """transformers on each model directory: prompt ids, logits, greedy continuation, chat."""
    out = {}
    for name, path in sources.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0].numpy()
            greedy = model.generate(
                ids, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False
            )[0, ids.shape[1] :].tolist()
        chat = None
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(
                CHAT, tokenize=False, add_generation_prompt=True
            )
            chat_ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt").input_ids
            answer = model.generate(chat_ids, max_new_tokens=64, do_sample=False)
            chat = {
                "prompt": rendered,
                "prompt_ids": chat_ids[0].tolist(),
                "text": tokenizer.decode(answer[0, chat_ids.shape[1] :], skip_special_tokens=True),
            }
        out[name] = {
            "tokenizer": tokenizer,
            "prompt_ids": ids[0].tolist(),
            "logits": logits,
            "greedy": greedy,
            "chat": chat,
        }
    return out


def probe(request: dict, workdir: Path) -> tuple[dict, np.ndarray | None]:
    """llama.cpp's answers to `request` (see tests/llama_cpp_probe.py), and the prompt's logits."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "request.json").write_text(json.dumps(request), encoding="utf-8")
    logits = workdir / "logits.npy"
    run = subprocess.run(
        [LLAMA_CPP_PYTHON, str(PROBE), str(workdir / "request.json"), str(workdir / "result.json")]
        + ([str(logits)] if request.get("prompt_ids") else []),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads((workdir / "result.json").read_text(encoding="utf-8"))
    return result, np.load(logits) if logits.exists() else None


@pytest.fixture(scope="module")
def runs(sources, reference, tmp_path_factory) -> dict:
    """Every (model, type): export it, then ask llama.cpp everything once (one load each)."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for name in MODELS:
        for out_type in TYPES:
            path = root / f"{name}.{out_type}.gguf"
            export_gguf(sources[name], path, out_type, progress=False)
            ref = reference[name]
            request = {
                "gguf": str(path),
                "texts": TEXTS,
                "prompt_ids": ref["prompt_ids"],
                "greedy_tokens": GREEDY_TOKENS,
                "chat": CHAT if ref["chat"] else None,
                "kv_cache": "f32" if out_type == "f32" else "f16",
            }
            result, logits = probe(request, root / f"{name}.{out_type}")
            want = ref["logits"]
            error = float(np.abs(logits - want).max() / np.abs(want).max())
            top1 = float((logits.argmax(-1) == want.argmax(-1)).mean())
            print(f"\n{name} {out_type}: logit error {error:.2e}, next token agrees {top1:.0%}")
            done[name, out_type] = {**result, "error": error, "top1": top1}
    return done


PARAMS = [(m, t) for m in MODELS for t in TYPES]


def test_the_original_smollm2_gives_the_fixture_ids(tmp_path):
    result, _ = probe({"gguf": str(smollm2_gguf()), "texts": TEXTS}, tmp_path)
    assert result["log_problems"] == []
    assert result["tokens"] == [case["ids"] for case in CASES]


@pytest.mark.parametrize(("name", "out_type"), PARAMS)
def test_loads_with_no_warning_and_tokenizes_as_the_source(runs, reference, name, out_type):
    result = runs[name, out_type]
    assert result["log_problems"] == []
    if name == "llama2":
        # SentencePiece as Meta's own tokenizer.json runs it. transformers 5 rewrites a Llama
        # tokenizer on load (a Metaspace pre-tokenizer) and then drops one "▁" from a run of
        # leading spaces and the "▁" after a special token; llama.cpp, like SentencePiece, keeps
        # them. The export writes the vocabulary and scores, so llama.cpp follows Meta's file.
        from tokenizers import Tokenizer

        meta = Tokenizer.from_file(str(LLAMA2_TOKENIZER / "tokenizer.json"))
        encode = lambda text: meta.encode(text, add_special_tokens=False).ids  # noqa: E731
    else:
        tokenizer = reference[name]["tokenizer"]
        encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    for text, ids in zip(TEXTS, result["tokens"], strict=True):
        assert ids == encode(text), text
    if name == "smollm2":
        assert result["tokens"] == [case["ids"] for case in CASES]


@pytest.mark.parametrize(("name", "out_type"), PARAMS)
def test_logits_agree_with_transformers(runs, name, out_type):
    result = runs[name, out_type]
    assert result["error"] <= BOUND[out_type]
    assert result["top1"] >= TOP1[out_type]


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_is_identical_in_f32(runs, reference, name):
    assert runs[name, "f32"]["greedy"] == reference[name]["greedy"]


@pytest.mark.parametrize("out_type", TYPES)
def test_chat_completion_uses_the_stored_template_and_stops_at_the_turn_end(
    runs, reference, out_type
):
    chat, want = runs["smollm2", out_type]["chat"], reference["smollm2"]["chat"]
    assert chat["format"] == "chat_template.default"
    assert chat["prompt"] == want["prompt"]
    assert chat["prompt_ids"] == want["prompt_ids"]
    print(f"\nsmollm2 {out_type} chat: {chat['finish_reason']}: {chat['text']!r}")
    if out_type in STOPS:
        assert chat["finish_reason"] == "stop"
        assert "Paris" in chat["text"]
    if out_type == "f32":
        assert chat["text"] == want["text"]
