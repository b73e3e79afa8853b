"""Benchmark: trainer tokens/s and peak memory per step, with and without activation
checkpointing and packing, under torchrun on this machine (CPU: gloo, FSDP2, 2 processes).

Each configuration is one real `torchrun -m vicuna_sky.train` run on FastChat's dummy
conversations; figures are medians over the steps after the first (warm-up). The default model is
the tiny Llama; `--size small` builds a larger random-weight Llama (hidden 512, 8 layers) where
activation memory matters more.

    .venv/bin/python benchmarks/train_throughput.py [--size tiny|small] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DUMMY = ROOT / "tests" / "fixtures" / "fastchat" / "dummy_conversation.json"


def build_model(size: str, out: Path) -> Path:
    from vicuna_sky.tiny import build_tiny_llama

    build_tiny_llama(out)
    if size == "small":
        import torch
        from transformers import AutoConfig, LlamaForCausalLM

        config = AutoConfig.from_pretrained(out)
        config.update(
            {
                "hidden_size": 512,
                "intermediate_size": 1408,
                "num_hidden_layers": 8,
                "num_attention_heads": 8,
                "num_key_value_heads": 8,
                "max_position_embeddings": 2048,
            }
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def run(
    model: Path,
    data: Path,
    workdir: Path,
    steps: int,
    max_length: int,
    nproc: int,
    checkpointing: bool,
    packing: bool,
) -> dict:
    workdir.mkdir(parents=True)
    args = [
        "--model-path",
        str(model),
        "--data-path",
        str(data),
        "--max-length",
        str(max_length),
        "--epochs",
        "100",
        "--max-steps",
        str(steps),
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "2",
        "--precision",
        "fp32",
        "--checkpoint-every-steps",
        "100000",
        "--gradient-checkpointing",
        str(checkpointing).lower(),
        "--packing",
        str(packing).lower(),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "vicuna_sky.train",
        *args,
    ]
    result = subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env={**os.environ, "VICUNA_SKY_CLOUD": ""}
    )
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    warm = metrics[1:] or metrics
    return {
        "tokens_per_second": statistics.median(m["tokens_per_second"] for m in warm),
        "seconds_per_step": statistics.median(m["seconds"] for m in warm),
        "peak_memory_mb": max(m["peak_memory_mb"] for m in metrics),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(args.size, tmp / "model")
        data = tmp / "data.json"
        data.write_text(DUMMY.read_text())
        print(
            f"{args.size} Llama, {args.nproc} processes on CPU, max length {args.max_length}, "
            f"global batch 8, {args.steps} steps per configuration"
        )
        print(
            f"{'activation ckpt':>16} {'packing':>8} {'tokens/s':>10} {'s/step':>8} "
            f"{'peak RSS MB/proc':>17}"
        )
        for checkpointing in (False, True):
            for packing in (False, True):
                name = f"ac{int(checkpointing)}-pack{int(packing)}"
                r = run(
                    model,
                    data,
                    tmp / name,
                    args.steps,
                    args.max_length,
                    args.nproc,
                    checkpointing,
                    packing,
                )
                print(
                    f"{checkpointing!s:>16} {packing!s:>8} "
                    f"{r['tokens_per_second']:>10,.0f} {r['seconds_per_step']:>8.3f} "
                    f"{r['peak_memory_mb']:>17,.0f}"
                )


if __name__ == "__main__":
    main()
