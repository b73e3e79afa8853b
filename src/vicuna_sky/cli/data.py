"""`vicuna-sky data`: clean, split and count ShareGPT data."""

from __future__ import annotations

from pathlib import Path

import click

from vicuna_sky.cli.app import app, console
from vicuna_sky.output import OVERWRITE_HELP


@app.group()
def data() -> None:
    """Prepare ShareGPT data: clean HTML exports, split to the context, count tokens."""


def _data_io(fn: click.decorators.FC) -> click.decorators.FC:
    fn = click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)(fn)
    fn = click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Worker processes (0 = all cores; never more than the cores).",
    )(fn)
    fn = click.option("-o", "--output", type=click.Path(path_type=Path), required=True)(fn)
    return click.argument("input_path", metavar="IN.json", type=click.Path(path_type=Path))(fn)


@data.command(name="clean")
@_data_io
@click.option(
    "--blocked-words",
    default="openai,chatgpt",
    show_default=True,
    help="Comma-separated words; a conversation containing one is dropped ('' = none).",
)
@click.option(
    "--min-chars",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Drop shorter conversations.",
)
@click.option("--lang", default=None, help="Keep one language only (ISO 639-1, e.g. en).")
def data_clean(
    input_path: Path,
    output: Path,
    workers: int,
    overwrite: bool,
    blocked_words: str,
    min_chars: int,
    lang: str | None,
) -> None:
    """HTML to markdown, UI residue removed, filters and de-duplication."""
    from vicuna_sky.data.clean import CleanConfig
    from vicuna_sky.data.pipeline import clean_file

    words = tuple(w.strip().lower() for w in blocked_words.split(",") if w.strip())
    config = CleanConfig(blocked_words=words, min_chars=min_chars, lang=lang, workers=workers)
    clean_file(input_path, output, config, overwrite=overwrite)


@data.command(name="split")
@_data_io
@click.option("--tokenizer", required=True, help="Tokenizer path or hub id of the model.")
@click.option(
    "--max-length", type=click.IntRange(min=1), required=True, help="Context length in tokens."
)
@click.option("--template", default="vicuna_v1.1", show_default=True)
@click.option(
    "--overlong",
    type=click.Choice(["truncate", "drop"]),
    default="truncate",
    show_default=True,
    help="What to do with one round longer than --max-length.",
)
def data_split(
    input_path: Path,
    output: Path,
    workers: int,
    overwrite: bool,
    tokenizer: str,
    max_length: int,
    template: str,
    overlong: str,
) -> None:
    """Split conversations on round boundaries to fit the context, as the template renders."""
    from vicuna_sky.data.pipeline import split_file
    from vicuna_sky.data.split import SplitConfig

    config = SplitConfig(tokenizer, max_length, template, overlong, workers)
    split_file(input_path, output, config, overwrite=overwrite)


@data.command(name="stats")
@click.argument("input_path", metavar="IN.json", type=click.Path(path_type=Path))
@click.option("--tokenizer", required=True, help="Tokenizer path or hub id of the model.")
@click.option("--max-length", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--template", default="vicuna_v1.1", show_default=True)
@click.option(
    "--write",
    is_flag=True,
    help="Also write IN.stats.json beside IN.json, where `vicuna-sky plan` reads the tokens.",
)
def data_stats(
    input_path: Path, tokenizer: str, max_length: int, template: str, write: bool
) -> None:
    """Tokens per epoch as the trainer sees them (the recipe's data.tokens)."""
    from vicuna_sky.data.pipeline import stats_file, write_stats

    s = stats_file(input_path, tokenizer, template, max_length)
    console.print(
        f"samples {s.samples}  tokens {s.tokens}  trainable tokens {s.trainable_tokens}  "
        f"longest {s.longest}  over max length {s.over_max_length}  packed sequences {s.packs}"
    )
    if write:
        console.print(f"wrote {write_stats(s, input_path)}")
