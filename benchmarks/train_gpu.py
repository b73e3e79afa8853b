"""GPU training benchmark: the trainer against a bare bf16 loop, same model, same batches.

    bash benchmarks/train_gpu.sh                          # one GPU, under 5 minutes
    .venv/bin/python benchmarks/train_gpu.py --smoke      # CPU, tiny: the machinery only

Nothing is downloaded. The model is a random-weight Llama with `--layers` Llama-2-7B layers
(hidden 4096, MLP 11008, 32 heads, the Llama-2 tokenizer's 32000-token vocabulary from
tests/fixtures); the data are ShareGPT-like conversations made from FastChat's dummy
conversations (tests/fixtures/fastchat): several joined into one multi-turn conversation, so
lengths spread from ~100 to ~2000 tokens, then packed into `--max-length` rows.

1. The trainer: `torchrun -m vicuna_sky.train` on one GPU (FSDP2, fp32 master weights, bf16
   compute, attention chosen as in training, packing), one periodic checkpoint mid-run (DCP
   async_save: its stall is measured), no export.
2. The bare loop: the same weights in bf16, fused AdamW, causal SDPA (no sample mask: an upper
   bound), the same packed rows padded to the same length, no FSDP, no checkpoint.

Both count real (non-padding) tokens. MFU = 6 x parameters x tokens/s / the GPU's peak bf16
dense FLOP/s (H100/H200 989 T). The goals of issue #14: the trainer at >= 90 % of the bare
loop's tokens/s, and >= 45 % MFU. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DUMMY = FIXTURES / "fastchat" / "dummy_conversation.json"
LLAMA2_TOKENIZER = FIXTURES / "tokenizers" / "llama2"
LLAMA2_7B_LAYER = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_model(out: Path, layers: int, smoke: bool) -> Path:
    """A random Llama saved with save_pretrained (bf16 on a GPU, as a checkpoint would be)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if smoke:
        from vicuna_sky.tiny import build_tiny_llama

        return build_tiny_llama(out)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA2_7B_LAYER,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising 2B parameters on the CPU takes a minute
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def count_parameters(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += _numel(f.get_slice(name).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def sharegpt_like(count: int, seed: int = 0) -> list[dict]:
    """`count` multi-turn conversations, each 1-24 of FastChat's dummy conversations joined
    (ShareGPT's lengths: most between a few hundred and two thousand tokens)."""
    dummy = json.loads(DUMMY.read_text())
    rng = random.Random(seed)
    out = []
    for i in range(count):
        turns = []
        for sample in rng.sample(dummy, rng.randint(1, 24)):
            turns += sample["conversations"]
        out.append({"id": f"bench-{i}", "conversations": turns})
    return out


def trainer_run(args: argparse.Namespace, model: Path, data: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    flags = {
        "model-path": model,
        "data-path": data,
        "max-length": args.max_length,
        "epochs": 1000,
        "max-steps": args.steps,
        "lr": 1e-5,
        "warmup-ratio": 0,
        "global-batch-size": args.global_batch,
        "micro-batch-size": args.micro_batch,
        "precision": "fp32" if args.smoke else "bf16",
        "gradient-checkpointing": str(args.activation_checkpointing).lower(),
        "packing": "true",
        "attention": args.attention,
        "checkpoint-every-steps": args.checkpoint_every,
        "final-checkpoint": "false",
        "checkpoint-dir": work / "checkpoints",
        "export-dir": "",
        "preemption-poll-seconds": 3600,
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "vicuna_sky.train",
        *(x for k, v in flags.items() for x in (f"--{k}", str(v))),
    ]
    # The trainer warns at every host sync from its third step on: listed in the result.
    env = {
        **os.environ,
        "VICUNA_SKY_CLOUD": "",
        "PYTHONPATH": _pythonpath(),
        "VICUNA_SKY_SYNC_DEBUG": "1",
    }
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    (work / "train.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"the trainer failed:\n{(result.stdout + result.stderr)[-4000:]}")
    attention = next(
        line.split("attention ", 1)[1].split(",")[0]
        for line in (result.stdout + result.stderr).splitlines()
        if "vicuna_sky.train: attention " in line
    )
    syncs = sorted(
        {
            line.split(": UserWarning")[0].strip()
            for line in (result.stdout + result.stderr).splitlines()
            if "called a synchronizing CUDA operation" in line and ": UserWarning" in line
        }
    )
    metrics = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[args.warmup :]
    saved = {m["step"] for m in metrics if "checkpoint_stall_seconds" in m}
    # A save holds the host up in its own step; the device idles in the next one.
    around = saved | {s + 1 for s in saved}
    steady = [m["seconds"] for m in timed if m["step"] not in around]
    typical = statistics.median(steady)
    tokens = [m["tokens_per_second"] for m in timed]
    return {
        "attention": attention,
        "tokens_per_second": statistics.median(tokens),
        "steady_tokens_per_second": statistics.median(
            m["tokens_per_second"] for m in timed if m["step"] not in around
        ),
        "slowest_step_tokens_per_second": min(tokens),
        "peak_memory_gb": max(m["peak_memory_mb"] for m in metrics) / 1024,
        "checkpoint_steps": sorted(saved),
        # Host time inside save() (the copy to host memory), and what the run lost to the
        # save: the extra time of the steps around it over a typical step.
        "checkpoint_host_stall_seconds": sum(
            m["checkpoint_stall_seconds"] for m in metrics if m["step"] in saved
        ),
        "checkpoint_stall_seconds": sum(
            max(0.0, m["seconds"] - typical) for m in timed if m["step"] in around
        ),
        "alloc_retries": max((m.get("alloc_retries", 0) for m in metrics), default=0),
        # Where a step made the host wait for the GPU (the checkpoint's save is expected here).
        "host_sync_sites": syncs,
    }


def bare_loop(args: argparse.Namespace, model_dir: Path, data: Path) -> dict:
    """The fewest moving parts that train the same model on the same rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna_sky.train.data import ResumableSampler, collate, load_dataset

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset(data, tokenizer, "vicuna_v1.1", args.max_length, packing=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).train()
    model.config.use_cache = False
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    sampler = ResumableSampler(len(dataset), args.global_batch, 42)
    pad_to = -(-args.max_length // 128) * 128
    pad_id = tokenizer.pad_token_id or 0
    seconds, tokens = [], []
    for _ in range(args.steps):
        batch = sampler.next_batch()
        started = time.perf_counter()
        for k in range(0, len(batch), args.micro_batch):
            # The rows as the trainer pads them. "flash_attention_2" makes no mask; position ids
            # are dropped below: one causal sequence per row.
            rows = batch[k : k + args.micro_batch]
            m = collate(dataset, rows, pad_id, "flash_attention_2", pad_to)
            # Pinned, non-blocking copies, as the trainer's: the host never waits mid-step.
            ids, labels = (
                (m[k].pin_memory().to(device, non_blocking=True) if device.type == "cuda" else m[k])
                for k in ("input_ids", "labels")
            )
            # No mask: is_causal SDPA over the whole row (samples see each other: an upper
            # bound on speed, not a correct packed loss).
            loss = model(input_ids=ids, labels=labels).loss
            (loss * args.micro_batch / len(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        tokens.append(sum(dataset.tokens[i] for i in batch))
    timed = list(zip(seconds, tokens, strict=True))[args.warmup :]
    rates = [t / s for s, t in timed]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "attention": "sdpa (causal, no sample mask)",
        "tokens_per_second": statistics.median(rates),
        "peak_memory_gb": peak,
    }


def _pythonpath() -> str:
    """The checkout first: the benchmark measures this tree, installed or not."""
    return os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="Llama-2-7B layers (7B has 32)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4, help="first steps not timed (compile)")
    # One save only: a checkpoint of 8 layers is 22 GB (fp32 weights and two Adam moments).
    parser.add_argument("--checkpoint-every", type=int, default=12, help="periodic checkpoints")
    parser.add_argument("--attention", default="auto")
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="in both runs (off by default: the bare loop and the trainer do the same work)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    parser.add_argument("--workdir", type=Path, help="keep the model, data and logs here")
    args = parser.parse_args()
    import torch

    if args.smoke:
        args.layers, args.max_length, args.global_batch, args.micro_batch = 2, 512, 4, 2
        args.steps, args.warmup, args.checkpoint_every = min(args.steps, 5), 1, 3
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --smoke for the CPU check of the machinery")
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from vicuna_sky.train.trainer import PEAK_FLOPS

    with tempfile.TemporaryDirectory(prefix="train-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log(f"building a random Llama with {args.layers} Llama-2-7B layers")
        model = build_model(work / "model", args.layers, args.smoke)
        params = count_parameters(model)
        data = work / "data.json"
        rows_needed = args.global_batch * args.steps
        data.write_text(json.dumps(sharegpt_like(max(64, rows_needed * 3))))
        log(f"{params / 1e9:.2f}B parameters; trainer, {args.steps} steps")
        trainer = trainer_run(args, model, data, work / "trainer")
        log("bare loop")
        bare = bare_loop(args, model, data)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = next((f for k, f in PEAK_FLOPS.items() if k in gpu), 0.0)
        for run in (trainer, bare):
            run["mfu"] = 6 * params * run["tokens_per_second"] / peak if peak else None
        ratio = trainer["tokens_per_second"] / bare["tokens_per_second"]
        result = {
            "gpu": gpu,
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "layers": args.layers,
            "params": params,
            "max_length": args.max_length,
            "global_batch": args.global_batch,
            "micro_batch": args.micro_batch,
            "steps": args.steps,
            "activation_checkpointing": args.activation_checkpointing,
            "trainer": trainer,
            "bare": bare,
            "ratio": ratio,
            "goals_met": {
                "ratio >= 0.90": ratio >= 0.9,
                "mfu >= 0.45": bool(trainer["mfu"] and trainer["mfu"] >= 0.45),
            },
            "seconds": time.monotonic() - started,
        }

    def mfu(run: dict) -> str:
        return f"{100 * run['mfu']:.1f} %" if run["mfu"] is not None else "-"

    print(f"\n{gpu}, {params / 1e9:.2f}B params, {args.max_length} tokens x {args.global_batch}")
    print(f"{'run':<10} {'attention':<32} {'tokens/s':>10} {'MFU':>8} {'peak GB':>8}")
    for name, run in (("trainer", trainer), ("bare", bare)):
        print(
            f"{name:<10} {run['attention']:<32} {run['tokens_per_second']:>10,.0f} "
            f"{mfu(run):>8} {run['peak_memory_gb'] or float('nan'):>8.1f}"
        )
    print(
        f"trainer / bare: {100 * ratio:.1f} %   steady {trainer['steady_tokens_per_second']:,.0f}"
        f" tokens/s, slowest step {trainer['slowest_step_tokens_per_second']:,.0f}; checkpoint"
        f" stall {trainer['checkpoint_stall_seconds']:.2f}s (host"
        f" {trainer['checkpoint_host_stall_seconds']:.2f}s)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
