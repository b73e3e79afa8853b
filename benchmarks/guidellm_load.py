"""Benchmark: guidellm (vLLM's load generator for OpenAI servers) against a local fleet.

A controller and one worker on 127.0.0.1 (the echo backend by default, or `--backend hf` with the
tiny random Llama), then a few seconds of constant-rate load from guidellm's `openai_http`
backend, streamed chat completions of synthetic prompts. guidellm checks `GET /health`, sends
vLLM's `ignore_eos` and `stream_options.continuous_usage_stats`, and counts tokens from the usage
on every chunk: the run is also a check that the fleet speaks what vLLM's tools expect.

guidellm pins click and huggingface_hub past the launcher's pins, so it runs from its own venv,
benchmarks/.venv-guidellm (made on first use from the package index; it sees the project venv's
torch through a .pth file instead of pulling several GB of another torch).

    .venv/bin/python benchmarks/guidellm_load.py [--rate 5] [--seconds 5] [--backend echo|hf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from vicuna_sky.serve.local_fleet import LocalFleet  # noqa: E402
from vicuna_sky.tiny import build_tiny_llama  # noqa: E402

VENV = HERE / ".venv-guidellm"
GUIDELLM = "guidellm==0.8.1"


def guidellm_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        Path(purelib, "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", GUIDELLM], check=True)
    return VENV / "bin" / "guidellm"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=5.0, help="requests per second")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--backend", choices=["echo", "hf"], default="echo")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    args = p.parse_args()
    guidellm = guidellm_venv()
    with tempfile.TemporaryDirectory() as tmp, LocalFleet(Path(tmp)) as fleet:
        model = build_tiny_llama(Path(tmp) / "tiny")  # guidellm's tokenizer, and the hf model
        fleet.start_controller()
        worker = fleet.start_worker(
            args.backend, "echo" if args.backend == "echo" else str(model), "m",
            "--max-concurrency", "64",
        )  # fmt: skip
        fleet.wait_workers({worker})
        report = Path(tmp) / "guidellm.json"
        command = [
            str(guidellm), "run",
            "--backend", f"kind=openai_http,target={fleet.url},model=m",
            "--profile", f"kind=constant,rate={args.rate}",
            "--constraint", f"kind=max_duration,seconds={args.seconds}",
            "--tokenizer", f"kind=huggingface_auto,model={model}",
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                      f"output_tokens={args.output_tokens}",
            "--output", f"kind=json,path={report}",
            "--disable-console-interactive",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "ERROR"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not report.exists():
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
            sys.exit(f"guidellm failed ({result.returncode})")
        print(result.stdout[-6000:])
        summarize(json.loads(report.read_text()))


def summarize(report: dict) -> None:
    """The figures that matter, whatever else the report holds."""
    for bench in report.get("benchmarks", []):
        metrics = bench.get("metrics", {})
        totals = metrics.get("request_totals", {})
        print(f"requests: {totals}")
        for name in (
            "requests_per_second",
            "request_latency",
            "time_to_first_token_ms",
            "inter_token_latency_ms",
            "output_tokens_per_second",
        ):
            stats = metrics.get(name, {}).get("successful", {})
            if stats:
                keep = {k: stats.get(k) for k in ("mean", "median", "max") if k in stats}
                pct = stats.get("percentiles", {})
                keep |= {k: pct[k] for k in ("p50", "p99") if k in pct}
                print(f"{name}: {keep}")


if __name__ == "__main__":
    main()
