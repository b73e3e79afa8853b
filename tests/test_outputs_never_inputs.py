"""The property behind issue #20: a command that writes, run with its output path set to one of
its own inputs (however the path is spelled: absolute, relative, through `..`, through a symlink,
with or without --overwrite), never changes a byte of any file that was there before."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
VICUNA_SKY = str(Path(sys.executable).parent / "vicuna-sky")
NOWHERE = "http://127.0.0.1:9/v1"  # nothing listens: a command must fail before it is asked

# command -> (argv with {NAME} placeholders, the inputs the output is set to, takes --overwrite)
COMMANDS = {
    "data clean": (
        [VICUNA_SKY, "data", "clean", "{in.json}", "-o", "{OUT}"],
        ["in.json"],
        True,
    ),
    "data split": (
        [VICUNA_SKY, "data", "split", "{in.json}", "-o", "{OUT}", "--tokenizer", "{tok}",
         "--max-length", "64", "--workers", "1"],
        ["in.json", "tok", "tok/tokenizer.json", "tok/tokenizer_config.json"],
        True,
    ),
    "data split --eval-output": (
        [VICUNA_SKY, "data", "split", "{in.json}", "-o", "train.json", "--eval-count", "1",
         "--eval-output", "{OUT}", "--tokenizer", "{tok}", "--max-length", "64", "--workers",
         "1"],
        ["in.json", "tok", "tok/tokenizer.json"],
        True,
    ),
    "eval answer": (
        [VICUNA_SKY, "eval", "answer", "--questions", "{q.jsonl}", "--model", "m",
         "--base-url", NOWHERE, "-o", "{OUT}", "--retries", "0"],
        ["q.jsonl"],
        False,
    ),
    "eval judge": (
        [VICUNA_SKY, "eval", "judge", "--mode", "single", "--questions", "{q.jsonl}",
         "--reference-answers", "{r.jsonl}", "--answers", "{a.jsonl}", "--judge-prompts",
         "{p.jsonl}", "--judge-model", "j", "--judge-base-url", NOWHERE, "-o", "{OUT}",
         "--retries", "0"],
        ["q.jsonl", "r.jsonl", "a.jsonl", "p.jsonl"],
        False,
    ),
    "eval report --json": (
        [VICUNA_SKY, "eval", "report", "--judgments", "{j.jsonl}", "--questions", "{q.jsonl}",
         "--reference", "m", "--json", "{OUT}"],
        ["j.jsonl", "q.jsonl"],
        True,
    ),
    "eval report --plots": (
        [VICUNA_SKY, "eval", "report", "--judgments", "{j.jsonl}", "--questions", "{q.jsonl}",
         "--reference", "m", "--plots", "{OUT}"],
        ["j.jsonl", "q.jsonl", "."],
        True,
    ),
    "delta make": (
        [VICUNA_SKY, "delta", "make", "--base", "{base}", "--target", "{target}", "--out",
         "{OUT}"],
        ["base", "target", "base/model.safetensors", "target/config.json"],
        False,
    ),
    "delta apply": (
        [VICUNA_SKY, "delta", "apply", "--base", "{base}", "--delta", "{delta}", "--out",
         "{OUT}"],
        ["base", "delta", "delta/delta_config.json"],
        False,
    ),
    "export gguf": (
        [VICUNA_SKY, "export", "gguf", "{base}", "-o", "{OUT}"],
        ["base", "base/model.safetensors", "base/config.json"],
        True,
    ),
    "checkpoints_sync pull": (
        [sys.executable, "-m", "checkpoints_sync", "pull", "{bucket}", "{OUT}"],
        ["bucket", "bucket/step-1", "ckpt"],
        False,
    ),
    "checkpoints_sync push": (
        [sys.executable, "-m", "checkpoints_sync", "push", "{ckpt/step-1}", "{OUT}"],
        ["ckpt/step-1"],
        False,
    ),
}  # fmt: skip

CASES = [(command, target) for command, (_, inputs, _) in COMMANDS.items() for target in inputs]


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def materials(tmp_path_factory) -> Path:
    """Every input, made once; each example works on a fresh copy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vicuna_sky.delta import make_delta

    root = tmp_path_factory.mktemp("materials")
    shutil.copytree(FIXTURES / "tokenizers" / "llama2", root / "tok")
    questions = [{"question_id": i, "category": "writing", "turns": [f"Write {i}."]}
                 for i in (1, 2)]  # fmt: skip
    _jsonl(root / "q.jsonl", questions)
    _jsonl(root / "r.jsonl", [{"question_id": 1, "model_id": "gpt-4",
                               "choices": [{"index": 0, "turns": ["ref"]}]}])  # fmt: skip
    answers = [{"question_id": i, "model_id": "m", "choices": [{"index": 0, "turns": ["x"]}]}
               for i in (1, 2)]  # fmt: skip
    _jsonl(root / "a.jsonl", answers)
    shutil.copy(FIXTURES / "fastchat" / "judge_prompts.jsonl", root / "p.jsonl")
    _jsonl(root / "j.jsonl", [{"mode": "single", "question_id": i, "turn": 1, "judge": "j",
                               "model": m, "score": s} for i in (1, 2)
                              for m, s in (("m", 7), ("n", 5))])  # fmt: skip
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(root / "base")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(root / "target")
    make_delta(root / "base", root / "target", root / "delta", progress=False)
    step = root / "ckpt" / "step-1"
    step.mkdir(parents=True)
    (step / ".metadata").write_text("step 1")
    (step / "__0_0.distcp").write_bytes(os.urandom(4096))
    pushed = subprocess.run(
        [sys.executable, "-m", "checkpoints_sync", "push", str(step), str(root / "bucket")],
        capture_output=True,
        text=True,
    )
    assert pushed.returncode == 0, pushed.stderr
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).digest()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


SPELLINGS = {
    "absolute": lambda work, rel: str(work / rel),
    "relative": lambda work, rel: rel,
    "dot-slash": lambda work, rel: f"./{rel}",
    "dot-dot": lambda work, rel: f"tok/../{rel}",
    "symlink": lambda work, rel: str(_alias(work, rel)),
}


def _alias(work: Path, rel: str) -> Path:
    alias = work / "alias"
    if not alias.is_symlink():
        alias.symlink_to((work / rel).resolve())
    return alias


samples = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=8),
            "conversations": st.lists(
                st.fixed_dictionaries(
                    {
                        "from": st.sampled_from(["human", "gpt", "system", "bot"]),
                        "value": st.text(max_size=80),
                    }
                ),
                max_size=4,
            ),
        }
    ),
    max_size=6,
)


@pytest.mark.parametrize(("command", "target"), CASES, ids=[f"{c}={t}" for c, t in CASES])
@settings(
    max_examples=2,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    spelling=st.sampled_from(sorted(SPELLINGS)),
    overwrite=st.booleans(),
    data=samples,
)
def test_no_input_is_ever_changed(materials, command, target, spelling, overwrite, data):
    argv, _, takes_overwrite = COMMANDS[command]
    work = Path(tempfile.mkdtemp(prefix="outputs-"))
    try:
        shutil.copytree(materials, work, dirs_exist_ok=True, symlinks=True)
        (work / "in.json").write_text(json.dumps(data))
        before = snapshot(work)
        out = SPELLINGS[spelling](work, target)
        args = [a.replace("{OUT}", out) for a in argv]
        args = [str(work / a[1:-1]) if a.startswith("{") else a for a in args]
        if takes_overwrite and overwrite:
            args.append("--overwrite")
        result = subprocess.run(
            args, cwd=work, capture_output=True, text=True, timeout=300, env=os.environ.copy()
        )
        after = snapshot(work)
        changed = [name for name, digest in before.items() if after.get(name) != digest]
        assert changed == [], f"{command} -> {out}: {changed}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        # The output path names an input (a directory of inputs, for the plots): writing there is
        # refused, except where it adds new files beside the inputs (plots, a pushed step).
        if result.returncode == 0:
            assert target in (".", "ckpt/step-1"), f"{command} -> {out}: not refused"
        else:
            assert result.returncode == 2, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)
