"""The trainer's configuration: one dataclass, filled from the command line sky/train.yaml uses."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError

ATTENTION_CHOICES = ("auto", "sdpa", "flex_attention", "flash_attention_2")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class TrainConfig:
    model_path: str
    """Local directory or hub id of a causal LM (Llama family first); `tiny-llama` builds one."""
    data_path: str
    """ShareGPT JSON, already cleaned and split (vicuna-sky data clean/split)."""
    eval_path: str = ""
    """Held-out ShareGPT JSON (`data split --eval-fraction`); empty = no validation loss."""
    eval_every_steps: int = 0
    """Validation loss every this many steps; with an eval set it is also computed before the
    first step of a fresh run (the base model's) and after the last. 0 = only those two."""
    template: str = "vicuna_v1.1"
    max_length: int = 2048
    epochs: float = 3.0
    lr: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    global_batch_size: int = 128
    micro_batch_size: int = 2
    precision: str = "bf16"
    """bf16 on GPU; CPU always computes in fp32."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in the backward pass."""
    packing: bool = False
    """Pack several samples per sequence (position ids restart, attention kept per sample)."""
    attention: str = "auto"
    """auto, sdpa, flex_attention or flash_attention_2. auto: flash_attention_2 when flash-attn
    is installed (GPU), flex_attention with a document mask for packed rows on GPU, else sdpa."""
    loss_chunk_tokens: int = 4096
    """Cross-entropy in chunks of this many tokens, each upcast to fp32 on its own: the full
    logits never get an fp32 copy."""
    lora_r: int = 0
    """LoRA rank (peft); 0 = full fine-tuning."""
    max_grad_norm: float = 1.0
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 2
    seed: int = 42
    checkpoint_url: str = ""
    """Bucket prefix for checkpoints (s3://, gs://, file://); empty = local checkpoints only."""
    export_url: str = ""
    """Where the final model is uploaded; empty = only the local export directory."""
    checkpoint_dir: str = "checkpoints"
    """Local directory DCP writes to before the upload."""
    export_dir: str = "export"
    """Where the final model is written; empty = no export (benchmarks)."""
    final_checkpoint: bool = True
    """Checkpoint after the last step too (off for benchmarks: nothing resumes from it)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); for smoke tests."""
    metrics_path: str = "metrics.jsonl"
    """Rank 0 appends one JSON line per step: step, loss, lr, tokens/s (and MFU on GPU)."""
    tensorboard_dir: str = "tensorboard"
    """TensorBoard event files (one folder per attempt); empty = none."""
    metrics_upload_seconds: float = 30.0
    """How often the metrics and event files are copied beside the checkpoints in the bucket."""
    run_name: str = ""
    """The run's name in W&B (when WANDB_API_KEY is set)."""
    preemption_poll_seconds: float = 5.0

    def check(self) -> None:
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise VicunaSkyError(
                f"--lr-scheduler {self.lr_scheduler!r}: cosine, linear or constant"
            )
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise VicunaSkyError(f"--precision {self.precision!r}: bf16, fp16 or fp32")
        if self.attention not in ATTENTION_CHOICES:
            raise VicunaSkyError(f"--attention {self.attention!r}: {', '.join(ATTENTION_CHOICES)}")
        for name in (
            "max_length",
            "global_batch_size",
            "micro_batch_size",
            "checkpoint_every_steps",
            "loss_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise VicunaSkyError(f"--{name.replace('_', '-')} must be at least 1")
        if self.keep_checkpoints < 2:
            raise VicunaSkyError("--keep-checkpoints must be at least 2")
        if not Path(self.data_path).is_file():
            raise VicunaSkyError(f"--data-path {self.data_path}: no such file")
        if self.eval_path and not Path(self.eval_path).is_file():
            raise VicunaSkyError(f"--eval-path {self.eval_path}: no such file")
        if self.eval_every_steps < 0:
            raise VicunaSkyError("--eval-every-steps must not be negative")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="torchrun ... -m vicuna_sky.train")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "bool": _bool, "str": str}[str(f.type)]
        if f.default is MISSING:
            parser.add_argument(flag, dest=f.name, type=kind, required=True)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))
