"""The final model as a plain Hugging Face directory: safetensors, tokenizer, chat template.

FSDP holds the weights in shards; they are gathered to full tensors on rank 0 (offloaded to
CPU one by one) and written with `save_pretrained`, which transformers and vLLM load directly.
A LoRA run is merged into the base weights first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from checkpoints_sync import open_store
from vicuna_sky.data.conversation import VICUNA_CHAT_TEMPLATE
from vicuna_sky.train.config import TrainConfig
from vicuna_sky.train.dist import World

log = logging.getLogger("vicuna_sky.train")


def _merged_lora(base_path: str, state: dict, config: TrainConfig) -> torch.nn.Module:
    """A CPU copy of the LoRA model with the trained weights, merged into plain weights."""
    from transformers import AutoModelForCausalLM

    from vicuna_sky.train.model import lora

    fresh = lora(
        AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32), config.lora_r
    )
    fresh.load_state_dict(state)
    return fresh.merge_and_unload()


def export(
    model: torch.nn.Module, tokenizer: Any, config: TrainConfig, world: World, base_path: str
) -> Path:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    out = Path(config.export_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if config.lora_r:
            merged = _merged_lora(base_path, state, config)
            merged.save_pretrained(out, safe_serialization=True)
        else:
            model.config.use_cache = True
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        if config.template == "vicuna_v1.1" and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        tokenizer.save_pretrained(out)
        if config.export_url:
            store = open_store(config.export_url)
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                store.put_file(path, path.relative_to(out).as_posix())
        log.info("exported to %s%s", out, f" and {config.export_url}" if config.export_url else "")
    torch.distributed.barrier()
    return out
