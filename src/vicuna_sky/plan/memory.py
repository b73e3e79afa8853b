"""Does the model train on these GPUs: memory per GPU under FSDP, against what a GPU offers.

Per GPU, for a model of P parameters on N GPUs (FSDP full sharding):
- model state, sharded: full fine-tuning with AdamW in mixed precision keeps fp32 master weights
  (4 bytes/param), fp32 gradients (4) and two Adam moments (8) = 16 bytes/param; LoRA keeps the
  frozen bf16 base (2), its adapters are small. P x bytes / N.
- the gathered layers: FSDP unshards one layer's bf16 weights to compute it, and prefetches the
  next: 2 layers x 2 bytes x P / layers.
- activations of one micro-batch (b sequences of s tokens, hidden size h, L layers): with
  activation checkpointing each layer keeps its bf16 input (2 b s h bytes) and one layer at a
  time holds its full activations again while recomputing (34 b s h bytes with SDPA/flash
  attention: Korthikanti et al. 2022, "Reducing Activation Recomputation", table 2, without the
  attention-matrix term); without checkpointing every layer holds 34 b s h. The logits and
  their gradient in fp32 add 2 x 4 b s V bytes (V the vocabulary).
A GPU offers `USABLE` of its memory: the CUDA context, NCCL buffers and the allocator's
fragmentation take the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vicuna_sky.plan import hardware
from vicuna_sky.recipe import Recipe

USABLE = 0.85
"""Of a GPU's memory, what training may plan on."""

EMPTY = dict.fromkeys(
    (
        "gpu",
        "need_gb_per_gpu",
        "usable_gb_per_gpu",
        "state_gb",
        "gathered_layers_gb",
        "activations_gb",
        "fits",
    )
)
"""MemoryFit.to_dict()'s keys, for a GPU whose memory is unknown."""

FULL_BYTES_PER_PARAM = 16.0
LORA_BYTES_PER_PARAM = 2.0

LLAMA_SHAPES = {6.74: (32, 4096), 13.0: (40, 5120), 32.5: (60, 6656), 65.2: (80, 8192)}
"""Llama (1 and 2) sizes in billions of parameters -> (layers, hidden size), from the models'
config.json; another size takes the nearest one's depth and the width its parameter count
implies (about 12 L h^2)."""
VOCAB = 32_000
"""Llama-2's vocabulary."""


def bytes_per_param(lora: bool) -> float:
    return LORA_BYTES_PER_PARAM if lora else FULL_BYTES_PER_PARAM


def shape(params_b: float) -> tuple[int, int]:
    """(layers, hidden) of a Llama-family model of this many billion parameters."""
    nearest = min(LLAMA_SHAPES, key=lambda b: abs(math.log(params_b / b)))
    layers, hidden = LLAMA_SHAPES[nearest]
    if abs(params_b / nearest - 1) > 0.05:
        hidden = int(math.sqrt(params_b * 1e9 / (12 * layers)))
    return layers, hidden


@dataclass(frozen=True)
class MemoryFit:
    gpu: str
    gpus: int
    states_gb: float
    """Weights, gradients and optimizer state: this GPU's shard."""
    gathered_gb: float
    activations_gb: float
    usable_gb: float
    """What one GPU offers training (USABLE of its memory)."""
    lora: bool

    @property
    def need_gb(self) -> float:
        return self.states_gb + self.gathered_gb + self.activations_gb

    @property
    def fits(self) -> bool:
        return self.need_gb <= self.usable_gb

    def line(self) -> str:
        verdict = "fits" if self.fits else "does not fit"
        kind = "LoRA" if self.lora else "full fine-tuning"
        return (
            f"{self.gpu}: needs {self.need_gb:,.1f} GB per GPU ({kind}: state "
            f"{self.states_gb:,.1f} sharded over {self.gpus}, gathered layers "
            f"{self.gathered_gb:,.1f}, activations {self.activations_gb:,.1f}), "
            f"{self.usable_gb:,.1f} GB usable -> {verdict}"
        )

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu,
            "need_gb_per_gpu": round(self.need_gb, 2),
            "usable_gb_per_gpu": round(self.usable_gb, 2),
            "state_gb": round(self.states_gb, 2),
            "gathered_layers_gb": round(self.gathered_gb, 2),
            "activations_gb": round(self.activations_gb, 2),
            "fits": self.fits,
        }


def fit(recipe: Recipe, gpu: str, gpus: int | None = None) -> MemoryFit | None:
    """The memory the recipe needs per GPU on `gpus` GPUs of type `gpu` (the recipe's count
    by default); None when the GPU's memory is unknown."""
    spec = hardware.lookup(gpu)
    if spec is None:
        return None
    r, t = recipe.resources, recipe.train
    gpus = gpus or r.gpus_per_node * r.nodes
    params = recipe.model.params_b * 1e9
    lora = t.lora_r > 0
    layers, hidden = shape(recipe.model.params_b)
    tokens = t.micro_batch_size * recipe.data.max_length
    if t.gradient_checkpointing:
        acts = layers * 2 * tokens * hidden + 34 * tokens * hidden
    else:
        acts = layers * 34 * tokens * hidden
    acts += 2 * 4 * tokens * VOCAB
    return MemoryFit(
        gpu=spec.name,
        gpus=gpus,
        states_gb=params * bytes_per_param(lora) / gpus / 1e9,
        gathered_gb=2 * 2 * params / layers / 1e9,
        activations_gb=acts / 1e9,
        usable_gb=spec.memory_gb * USABLE,
        lora=lora,
    )
