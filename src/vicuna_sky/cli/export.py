"""`vicuna-sky export`: a trained model in another runtime's format."""

from __future__ import annotations

from pathlib import Path

import click

from vicuna_sky.cli.app import app, console
from vicuna_sky.output import OVERWRITE_HELP

PATH = click.Path(path_type=Path)


@app.group()
def export() -> None:
    """Export a trained model for another runtime."""


@export.command(name="gguf")
@click.argument("model_dir", type=PATH)
@click.option("-o", "--out", type=PATH, required=True, help="The GGUF file to write.")
@click.option(
    "--type",
    "out_type",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f16",
    show_default=True,
    help="Type of the weight matrices (norms stay f32); f32 is exact, q8_0 about a quarter.",
)
@click.option(
    "--metadata",
    type=PATH,
    help="JSON of general.* keys (llama.cpp's --metadata format: name, license, ...).",
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def export_gguf(
    model_dir: Path, out: Path, out_type: str, metadata: Path | None, overwrite: bool
) -> None:
    """A Llama-family model directory (safetensors) as one GGUF file for llama.cpp."""
    from vicuna_sky.gguf.export import export_gguf as export

    done = export(model_dir, out, out_type, metadata=metadata, overwrite=overwrite)
    console.print(
        f"wrote {done['path']}: {done['type']}, {done['tensors']} tensors, "
        f"{done['parameters']:,} parameters, {done['bytes'] / 2**20:.1f} MiB, "
        f"tokenizer {done['tokenizer']} ({done['tokens']} tokens)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
