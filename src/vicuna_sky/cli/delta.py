"""`vicuna-sky delta`: publish fine-tuned weights as a delta over a base model, and back."""

from __future__ import annotations

from pathlib import Path

import click

from vicuna_sky.cli.app import app, console
from vicuna_sky.output import check_output_dir

DIR = click.Path(path_type=Path)


@app.group()
def delta() -> None:
    """Delta weights (target - base), streamed tensor by tensor from safetensors or .bin shards."""


@delta.command(name="make")
@click.option("--base", type=DIR, required=True, help="Base model directory.")
@click.option("--target", type=DIR, required=True, help="Fine-tuned model directory.")
@click.option("--out", type=DIR, required=True, help="Delta directory to create.")
def delta_make(base: Path, target: Path, out: Path) -> None:
    """Write target - base (in a wider dtype), with the target's tokenizer and config."""
    # A refused output is answered before torch is imported (seconds); make_delta checks again.
    check_output_dir(out, (base, target), offer_overwrite=False)
    from vicuna_sky.delta import make_delta

    console.print(f"delta written to {make_delta(base, target, out)}", markup=False)


@delta.command(name="apply")
@click.option("--base", type=DIR, required=True, help="Base model directory.")
@click.option("--delta", "delta_dir", type=DIR, required=True, help="Delta directory.")
@click.option("--out", type=DIR, required=True, help="Model directory to create.")
def delta_apply(base: Path, delta_dir: Path, out: Path) -> None:
    """Rebuild the fine-tuned model: base + delta, in the target's dtype."""
    check_output_dir(out, (base, delta_dir), offer_overwrite=False)  # as in `delta make`
    from vicuna_sky.delta import apply_delta

    console.print(f"model written to {apply_delta(base, delta_dir, out)}", markup=False)
