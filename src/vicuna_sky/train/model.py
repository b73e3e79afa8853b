"""The model: loaded from a path or hub id, attention chosen, checkpointed, sharded with FSDP2."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from torch import nn

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.train.config import TrainConfig
from vicuna_sky.train.dist import World

log = logging.getLogger("vicuna_sky.train")


def attention_implementation(world: World) -> str:
    if world.device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def compute_dtype(config: TrainConfig, world: World) -> torch.dtype:
    if world.device.type != "cuda":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (transformers names their classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise VicunaSkyError(f"{type(model).__name__}: cannot find its decoder layers to shard")
    return layers


def load(config: TrainConfig, path: str, world: World) -> tuple[nn.Module, str]:
    from transformers import AutoModelForCausalLM

    attn = attention_implementation(world)
    try:
        # Master weights in fp32; FSDP's mixed-precision policy computes in bf16 on GPU.
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation=attn
        )
    except (OSError, ValueError) as e:
        raise VicunaSkyError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    model.config.use_cache = False
    # from_pretrained returns the model in eval mode, where transformers skips both dropout and
    # activation checkpointing (each asks `self.training`): training needs train mode.
    model.train()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r:
        model = lora(model, config.lora_r)
    return model, attn


def lora(model: nn.Module, r: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise VicunaSkyError("--lora-r needs peft: pip install peft") from None
    lora = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    return get_peft_model(model, lora)


def shard(model: nn.Module, config: TrainConfig, world: World, mesh: Any) -> nn.Module:
    """FSDP2: each decoder layer its own unit (gathered just in time), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = compute_dtype(config, world)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    model.to(world.device)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
