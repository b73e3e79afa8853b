"""A newcomer's journey on the local backend, as the README tells it: their own ShareGPT file
(not the bundled sample) and a recipe copied from smollm2-cpu.yaml, with a ChatML tiny model in
place of SmolLM2 (for time). Clean, split and count with the recipe; train; serve with
`serve --fleet --local`, where the worker prompts with the recipe's ChatML template; evaluate
with `eval launch --local`; then logs, status and down, all through the real console script."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vicuna_sky.procs import signal_tree
from vicuna_sky.tiny import CHATML, build_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "vicuna-sky")
TOPICS = [
    ("How do I water a cactus?", "Water it <b>deeply</b> but rarely, once the soil is dry."),
    ("What is a haiku?", "A short poem of three lines with five, seven and five syllables."),
    ("Why is the sky blue?", "Air scatters blue light more than red light, so we see blue."),
    ("How do I boil an egg?", "Put it in boiling water for seven to nine minutes, then cool it."),
    ("What is a prime number?", "A whole number above one whose only divisors are 1 and itself."),
    ("Name a fast land animal.", "The cheetah runs at up to about 100 kilometres per hour."),
    ("How do tides work?", "The moon's gravity pulls the oceans, raising two bulges of water."),
    ("What is recursion?", "A function that calls itself on a smaller part of the problem."),
    ("Why do leaves fall?", "Trees shed leaves in autumn to save water through the winter."),
    ("What is a budget?", "A plan for how much money you will spend and save each month."),
    ("How do I tie a knot?", "Cross the ends, tuck one under and pull both ends tight."),
    ("What is bread made of?", "Flour, water, salt and yeast, kneaded and left to rise."),
]


def _own_data(path: Path) -> None:
    conversations = [
        {
            "id": f"mine-{i}",
            "conversations": [
                {"from": "human", "value": q},
                {"from": "gpt", "value": f"<p>{a}</p>"},
                {"from": "human", "value": "Tell me more, please."},
                {"from": "gpt", "value": f"Certainly. {a} That is the short version of it."},
            ],
        }
        for i, (q, a) in enumerate(TOPICS)
    ]
    path.write_text(json.dumps(conversations, indent=1))


def _recipe(path: Path, model: Path) -> None:
    """smollm2-cpu.yaml as a user adapts it: their model, their data, their bucket."""
    text = (ROOT / "recipes" / "smollm2-cpu.yaml").read_text()
    for old, new in (
        ("\nname: vicuna-smol", "\nname: my-chat"),
        ("  path: smollm2-135m", f"  path: {model}"),
        ("path: demo-sample", "path: data/mine.json"),
        ("s3://vicuna-sky-smol", "s3://my-bucket"),
        ("  model_name: vicuna-smol", "  model_name: my-chat"),
        ("  judge_model: vicuna-smol", "  judge_model: my-chat"),
        ("  baseline_path: smollm2-135m", f"  baseline_path: {model}"),
        ("  workers: 2", "  workers: 1"),
        ("  epochs: 3", "  epochs: 1"),
        # The tiny model's context is 1024 tokens: shorter answers keep the judge's pairwise
        # prompt (two answers to two turns) inside it. SmolLM2's is 8192.
        ("  max_tokens: 64", "  max_tokens: 24"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [EXE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, (args, out.stdout[-3000:], out.stderr[-3000:])
    return out


def test_own_data_and_recipe_through_every_stage(tmp_path, monkeypatch):
    for key in ("VICUNA_SKY_API_KEYS", "VICUNA_SKY_FLEET_SECRET", "VICUNA_SKY_UI_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    model = build_tiny_llama(tmp_path / "my-model", chat_template=CHATML)
    _own_data(tmp_path / "mine_raw.json")
    _recipe(tmp_path / "my.yaml", model)

    # Data: clean, then split and count with the recipe, into the folder the dry run names.
    _cli("data", "clean", "mine_raw.json", "-o", "mine_clean.json", cwd=tmp_path)
    dry = _cli("train", "my.yaml", "--local", "--dryrun", "--workdir", "w", cwd=tmp_path)
    target = Path(re.search(r"  data: (\S+)", dry.stdout).group(1))
    assert target == tmp_path / "w" / "buckets" / "s3" / "my-bucket" / "data" / "mine.json"
    split = _cli("data", "split", "mine_clean.json", "-o", str(target), "--recipe", "my.yaml",
                 cwd=tmp_path)  # fmt: skip
    assert "max 256 tokens, chat_template" in " ".join(split.stdout.split())
    stats = _cli("data", "stats", str(target), "--recipe", "my.yaml", cwd=tmp_path)
    assert "(chat_template, max length 256)" in stats.stdout
    segments = json.loads(target.read_text())
    # The recipe holds a quarter of the conversations out (data.eval_fraction), whole.
    held_out = json.loads(target.with_name("mine.eval.json").read_text())
    trained = {s["id"].split("_")[0] for s in segments}
    held = {s["id"].split("_")[0] for s in held_out}
    assert trained | held == {f"mine-{i}" for i in range(12)} and not trained & held
    assert len(held) == 3

    # Train: the summary says where the model is.
    trained = _cli("train", "my.yaml", "--local", "--workdir", "w", cwd=tmp_path)
    text = " ".join(trained.stdout.split())
    assert re.search(r"trained: 1 attempt\(s\), [\d.]+ min; \d+ steps, final loss", text)
    assert f"model: {tmp_path / 'w' / 'export'}" in text

    # Serve: the fleet on loopback; the worker prompts the trained model with ChatML.
    fleet = subprocess.Popen(
        [EXE, "serve", "my.yaml", "--fleet", "--local", "--workdir", "w"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        lines = []
        while not any("chat UI:" in x for x in lines):
            line = fleet.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        api = re.search(r"OpenAI API: (\S+)", "".join(lines)).group(1)
        messages = [{"role": "user", "content": "How do I water a cactus?"}]
        r = httpx.post(
            f"{api}/chat/completions",
            json={"model": "my-chat", "messages": messages, "max_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        from transformers import AutoTokenizer

        exported = AutoTokenizer.from_pretrained(tmp_path / "w" / "export")
        chatml = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chatml.startswith("<|im_start|>user\n")
        want = len(exported(chatml, add_special_tokens=False).input_ids)
        assert r.json()["usage"]["prompt_tokens"] == want
        listed = _cli("status", "--local", "--runs-dir", "w/runs", cwd=tmp_path).stdout
        assert "my-chat-train" in listed and "my-chat-worker-0" in listed
        down = _cli("down", "my-chat", "--local", "--runs-dir", "w/runs", cwd=tmp_path)
        assert "my-chat-controller" in down.stdout and "my-chat-worker-0" in down.stdout
        fleet.wait(60)
    finally:
        if fleet.poll() is None:
            signal_tree(fleet.pid, signal.SIGKILL)  # the controller and workers too
    assert fleet.returncode == 128 + signal.SIGTERM

    # Evaluate: the recipe's copy of smollm2-cpu's eval, its report where the summary says.
    started = time.monotonic()
    evaluated = _cli("eval", "launch", "my.yaml", "--local", "--workdir", "w", cwd=tmp_path)
    report = re.search(r"report: (\S+)", evaluated.stdout).group(1)
    assert Path(report).is_file(), evaluated.stdout
    assert json.loads(Path(report).read_text())
    print(f"\neval launch: {time.monotonic() - started:.0f} s")

    # Logs and status find every run.
    logs = _cli("logs", "my-chat-train", "--local", "--runs-dir", "w/runs", cwd=tmp_path)
    assert "run-rank0.log" in logs.stdout
    status = _cli("status", "--local", "--runs-dir", "w/runs", cwd=tmp_path).stdout
    for job in ("my-chat-train", "my-chat-eval", "my-chat-controller", "my-chat-worker-0"):
        assert job in status
    assert "SUCCEEDED" in status and "CANCELLED" in status
