"""Training tokens per second per GPU, for any GPU type, and where the figure came from.

In order: the recipe's measured `plan.tokens_per_gpu_second` (on its first accelerator); the
packaged benchmark table (assets/train_throughput.json) for the same GPU and packing mode, scaled
to this model by FLOPs per token (6 x params); a measurement on another GPU, its MFU moved to this
GPU's peak ("transferred": the same software is assumed to reach the same fraction of peak);
the recipe's `plan.mfu` only where nothing of the kind was measured ("assumed").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources

from vicuna_sky.plan import hardware
from vicuna_sky.plan.errors import PlanError
from vicuna_sky.recipe import Recipe

BENCHMARKS = "train_throughput.json"
"""The packaged table of measured training throughput (vicuna_sky/assets)."""


@dataclass(frozen=True)
class Throughput:
    per_gpu: float
    """Training tokens per second per GPU."""
    source: str
    """recipe, measured, transferred or assumed."""
    basis: str


def load_benchmarks() -> list[dict]:
    text = resources.files("vicuna_sky.assets").joinpath(BENCHMARKS).read_text()
    return json.loads(text)["rows"]


def peak(gpu: str) -> float:
    spec = hardware.lookup(gpu)
    if spec is None:
        known = ", ".join(hardware.GPUS)
        raise PlanError(
            f"no peak FLOP/s known for GPU '{gpu}' (known: {known}); set "
            "plan.tokens_per_gpu_second in the recipe"
        )
    return spec.peak_flops


def throughput(
    recipe: Recipe,
    gpu: str | None = None,
    rows: list[dict] | None = None,
    packing: bool | None = None,
) -> Throughput:
    """Tokens/s per GPU of type `gpu` (the recipe's accelerator by default); `packing` overrides
    the recipe's (the seed's settings are priced unpacked)."""
    acc = gpu or recipe.resources.accelerator or ""
    params = recipe.model.params_b * 1e9
    flops_per_token = 6 * params
    own = recipe.resources.accelerator or ""
    measured = recipe.plan.tokens_per_gpu_second
    if measured > 0 and packing in (None, recipe.train.packing):
        if acc.lower() == own.lower():
            return Throughput(
                measured,
                "recipe",
                f"measured: {measured:,.0f} tokens/s per GPU on {own} "
                "(the recipe's plan.tokens_per_gpu_second)",
            )
        mfu = measured * flops_per_token / peak(own)
        rate = mfu * peak(acc) / flops_per_token
        return Throughput(
            rate,
            "transferred",
            f"transferred: the recipe's {measured:,.0f} tokens/s on {own} is {mfu:.1%} MFU; "
            f"at {acc}'s peak {peak(acc) / 1e12:.0f} TFLOP/s = {rate:,.0f} tokens/s per GPU",
        )
    packing = recipe.train.packing if packing is None else packing
    ac = recipe.train.gradient_checkpointing
    kind = [
        r
        for r in (load_benchmarks() if rows is None else rows)
        if r["packing"] == packing and r["activation_checkpointing"] == ac
    ]
    mode = f"{'packed' if packing else 'unpacked'}{', activation checkpointing' if ac else ''}"

    def nearest(pool: list[dict]) -> dict:
        return min(pool, key=lambda r: abs(math.log(r["params"] / params)))

    same = [r for r in kind if r["gpu"].lower() == acc.lower()]
    if same:
        row = nearest(same)
        rate = row["tokens_per_second"] * row["params"] / params
        return Throughput(
            rate,
            "measured",
            (
                f"measured on {row['gpu']}: {row['tokens_per_second']:,.0f} tokens/s for "
                f"{row['model']} ({row['params'] / 1e9:.2f}B, {mode}, length {row['seq_len']}, "
                f"{row['software'].split(',')[0]}; {row['source']}), scaled by FLOPs per token to "
                f"{recipe.model.params_b:g}B = {rate:,.0f} tokens/s per GPU"
            ),
        )
    target = peak(acc)
    other = [r for r in kind if hardware.lookup(r["gpu"])]
    if other:
        row = nearest(other)
        mfu = 6 * row["params"] * row["tokens_per_second"] / peak(row["gpu"])
        rate = mfu * target / flops_per_token
        return Throughput(
            rate,
            "transferred",
            (
                f"transferred: MFU {mfu:.1%} measured on {row['gpu']} ({row['model']}, {mode}; "
                f"{row['source']}) applied to {acc}'s peak {target / 1e12:.0f} TFLOP/s at "
                f"{flops_per_token / 1e9:.0f} GFLOP/token = {rate:,.0f} tokens/s per GPU "
                f"(nothing measured on {acc})"
            ),
        )
    rate = recipe.plan.mfu * target / flops_per_token
    return Throughput(
        rate,
        "assumed",
        (
            f"assumed: {recipe.plan.mfu:.0%} MFU (plan.mfu; nothing measured {mode}) of {acc} "
            f"peak {target / 1e12:.0f} TFLOP/s at {flops_per_token / 1e9:.0f} GFLOP/token = "
            f"{rate:,.0f} tokens/s per GPU"
        ),
    )
