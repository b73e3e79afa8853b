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


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attention_implementation(
    requested: str, device: torch.device, packing: bool, dropout: float = 0.0
) -> str:
    """The attention transformers runs. flash-attn is used when a user brings it, never
    required: torch's own kernels are as fast for training (issue #14's H200 figures: flex with a
    document mask 44.3K tokens/s, causal SDPA 43.9K, SDPA with a dense block-causal mask 40.9K).

    auto: flash_attention_2 when installed (GPU; it reads sample boundaries from position ids);
    else for packed rows on a GPU flex_attention with a block-sparse document mask (no dense
    [L, L] mask, fully masked blocks skipped); else SDPA (unpacked rows: a padding mask; packed
    rows on CPU: the dense block-causal mask, where memory for it is no concern). flex_attention
    has no attention dropout, so a model with dropout stays on SDPA, and no backward on CPU."""
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if has_flash:
            return "flash_attention_2"
        if packing and device.type == "cuda" and flex_available() and not dropout:
            return "flex_attention"
        return "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise VicunaSkyError(
            "--attention flash_attention_2 needs a GPU and flash-attn installed "
            "(or --attention auto: torch's flex_attention / SDPA)"
        )
    if requested == "flex_attention":
        if not flex_available():
            raise VicunaSkyError("--attention flex_attention needs torch>=2.5")
        if device.type != "cuda":
            # torch runs flex_attention's forward on CPU (tests compare its logits), not its
            # backward: "FlexAttention does not support backward on CPU".
            raise VicunaSkyError("--attention flex_attention trains on GPUs only; CPU uses sdpa")
        if dropout:
            raise VicunaSkyError(
                f"--attention flex_attention has no attention dropout (the model has {dropout})"
            )
    return requested


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
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        dropout = float(getattr(AutoConfig.from_pretrained(path), "attention_dropout", 0) or 0)
    except (OSError, ValueError) as e:
        raise VicunaSkyError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    attn = attention_implementation(config.attention, world.device, config.packing, dropout)
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
    """FSDP2: each decoder layer its own unit (gathered just in time), then the root.

    A unit resharded after its forward is gathered (and cast from the fp32 master weights to
    the compute dtype) again for its backward. That buys memory only when there is something to
    shard: one process keeps its compute-dtype weights from forward to backward, and the last
    layer, whose backward comes right after its forward, is never resharded (as torchtitan)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = compute_dtype(config, world)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    model.to(world.device)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        reshard = world.size > 1 and i < len(layers) - 1
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=world.size > 1)
    return model


def optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on the fp32 master weights, fused: one kernel over all parameters instead of a
    few per tensor (torch has it for CUDA and CPU, on FSDP2's DTensors too), so CPU tests run
    the optimizer GPUs run."""
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


def document_block_mask(segments: torch.Tensor) -> Any:
    """flex_attention's BlockMask for packed rows: causal, and a token sees only tokens of its
    own sample (`segments` [batch, length]: equal ids = one sample). Made once per micro-batch
    on the device, shared by every layer (and their recomputation); blocks of 128 x 128 that no
    token may see are skipped by the kernel instead of being masked element by element."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_sample_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (segments[b, q] == segments[b, kv]) & (q >= kv)

    batch, length = segments.shape
    return create_block_mask(
        same_sample_causal,
        batch,
        None,
        length,
        length,
        device=segments.device,
        # Up to 4096 tokens the mask is built from a few [batch, L, L] boolean tensors (64 MB at
        # 4 x 4096), which costs less than compiling its construction, on any device: CPU tests
        # run the GPU's path. Longer rows compile it (no [L, L] tensor at all).
        _compile=length > 4096,
    )
