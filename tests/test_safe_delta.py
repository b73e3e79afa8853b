"""Bad input never loses data: `vicuna-sky delta make|apply` with outputs that are files, under
files, inputs or inside them, and the litter of a killed run (issue #20)."""

import subprocess
import sys
from pathlib import Path

import pytest

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from checkpoints_sync.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    for seed, name in ((0, "base"), (1, "target")):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(root / name)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert text in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("out", "text"),
    [
        ("file", "is a file, not a directory"),
        ("file/delta", "is a file, not a directory"),
        ("base", "overlaps the input"),
        ("base/delta", "overlaps the input"),
        ("target/model.safetensors", "overlaps the input"),
        (".", "overlaps the input"),
    ],
)
def test_delta_outputs_that_cannot_be(cli, models, tmp_path, out, text):
    (tmp_path / "file").write_text("mine")
    before = snapshot(models)
    base, target = str(models / "base"), str(models / "target")
    where = tmp_path / out if not out.startswith(("base", "target", ".")) else models / out
    result = cli("delta", "make", "--base", base, "--target", target, "--out", str(where))
    one_line_error(result, text)
    assert snapshot(models) == before and (tmp_path / "file").read_text() == "mine"


def test_a_killed_delta_leaves_litter_the_next_run_removes(cli, models, tmp_path):
    out = tmp_path / "out"
    assert subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)]).returncode == -9
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    result = cli("delta", "make", "--base", str(models / "base"), "--target",
                 str(models / "target"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "delta_config.json").is_file()
    again = cli("delta", "make", "--base", str(models / "base"), "--target",
                str(models / "target"), "--out", str(out))  # fmt: skip
    one_line_error(again, "already exists and is not empty")
