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
@click.option(
    "--dropped",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the id and rule of every conversation left out, one JSON line each.",
)
def data_clean(
    input_path: Path,
    output: Path,
    workers: int,
    overwrite: bool,
    blocked_words: str,
    min_chars: int,
    lang: str | None,
    dropped: Path | None,
) -> None:
    """HTML to markdown, UI residue removed, filters and de-duplication."""
    from vicuna_sky.data.clean import CleanConfig
    from vicuna_sky.data.pipeline import clean_file

    words = tuple(w.strip().lower() for w in blocked_words.split(",") if w.strip())
    config = CleanConfig(blocked_words=words, min_chars=min_chars, lang=lang, workers=workers)
    clean_file(input_path, output, config, overwrite=overwrite, dropped=dropped)


RECIPE_HELP = (
    "A recipe (path or bundled name): its model.path (tokenizer), model.template and "
    "data.max_length are the defaults."
)


def _model_options(fn: click.decorators.FC) -> click.decorators.FC:
    """--recipe, and the --tokenizer, --max-length and --template that override it."""
    fn = click.option("--template", default=None, help="[the recipe's, else vicuna_v1.1]")(fn)
    fn = click.option(
        "--max-length",
        type=click.IntRange(min=1),
        default=None,
        help="Context length in tokens [the recipe's, else 2048].",
    )(fn)
    fn = click.option(
        "--tokenizer",
        default=None,
        help="Tokenizer path, hub id or built-in model name (tiny-llama, smollm2-135m).",
    )(fn)
    return click.option("--recipe", default=None, help=RECIPE_HELP)(fn)


def _from_recipe(
    recipe: str | None, tokenizer: str | None, max_length: int | None, template: str | None
) -> tuple[str, int, str]:
    """The tokenizer (a built-in name made into its directory), context length and template:
    given options win, then the recipe's, then the defaults (vicuna_v1.1, 2048)."""
    from vicuna_sky.models import resolve_model_path

    if recipe is not None:
        from vicuna_sky.launch.runner import load_recipe

        r = load_recipe(recipe)
        tokenizer = tokenizer or r.model.path
        max_length = max_length or r.data.max_length
        template = template or r.model.template
    if tokenizer is None:
        raise click.UsageError("give --tokenizer or --recipe")
    return resolve_model_path(tokenizer), max_length or 2048, template or "vicuna_v1.1"


@data.command(name="split")
@_data_io
@_model_options
@click.option(
    "--overlong",
    type=click.Choice(["truncate", "drop"]),
    default="truncate",
    show_default=True,
    help="What to do with one round longer than --max-length.",
)
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Hold out this share of the conversations for evaluation [the recipe's "
    "data.eval_fraction, else 0].",
)
@click.option(
    "--eval-count",
    type=click.IntRange(min=1),
    default=None,
    help="Hold out this many conversations for evaluation (instead of --eval-fraction).",
)
@click.option(
    "--eval-output",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the held-out conversations go [OUT.eval.json beside -o].",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Which conversations are held out [the recipe's train.seed, else 0].",
)
def data_split(
    input_path: Path,
    output: Path,
    workers: int,
    overwrite: bool,
    recipe: str | None,
    tokenizer: str | None,
    max_length: int | None,
    template: str | None,
    overlong: str,
    eval_fraction: float | None,
    eval_count: int | None,
    eval_output: Path | None,
    seed: int | None,
) -> None:
    """Split conversations on round boundaries to fit the context, as the template renders.
    With --eval-fraction or --eval-count, whole conversations are held out for evaluation."""
    from vicuna_sky.data.pipeline import eval_path_for, split_file
    from vicuna_sky.data.split import SplitConfig

    if eval_fraction is not None and eval_count is not None:
        raise click.UsageError("give --eval-fraction or --eval-count, not both")
    if recipe is not None:
        from vicuna_sky.launch.runner import load_recipe

        r = load_recipe(recipe)
        if eval_count is None and eval_fraction is None:
            eval_fraction = r.data.eval_fraction
        seed = r.train.seed if seed is None else seed
    tokenizer, max_length, template = _from_recipe(recipe, tokenizer, max_length, template)
    config = SplitConfig(
        tokenizer,
        max_length,
        template,
        overlong,
        workers,
        eval_fraction=eval_fraction or 0.0,
        eval_count=eval_count or 0,
        seed=seed or 0,
    )
    held = config.eval_count or config.eval_fraction
    eval_output = (eval_output or eval_path_for(output)) if held else None
    split_file(input_path, output, config, overwrite=overwrite, eval_dst=eval_output)


@data.command(name="stats")
@click.argument("input_path", metavar="IN.json", type=click.Path(path_type=Path))
@_model_options
@click.option(
    "--write",
    is_flag=True,
    help="Also write IN.stats.json beside IN.json, where `vicuna-sky plan` reads the tokens.",
)
def data_stats(
    input_path: Path,
    recipe: str | None,
    tokenizer: str | None,
    max_length: int | None,
    template: str | None,
    write: bool,
) -> None:
    """Tokens per epoch as the trainer sees them (the recipe's data.tokens)."""
    from vicuna_sky.data.pipeline import stats_file, write_stats

    tokenizer, max_length, template = _from_recipe(recipe, tokenizer, max_length, template)
    s = stats_file(input_path, tokenizer, template, max_length)
    console.print(
        f"samples {s.samples}  tokens {s.tokens}  trainable tokens {s.trainable_tokens}  "
        f"longest {s.longest}  over max length {s.over_max_length}  packed sequences {s.packs}"
        f"  ({template}, max length {max_length})"
    )
    if write:
        console.print(f"wrote {write_stats(s, input_path)}")


@data.command(name="push")
@click.argument("input_path", metavar="FILE", type=click.Path(path_type=Path))
@click.option("--recipe", required=True, help="The recipe whose bucket the data goes to.")
@click.option(
    "--local", is_flag=True, help="The local backend's folder for that bucket, not the cloud's."
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="With --local: the workdir of `train --local --workdir W` (its buckets are W/buckets).",
)
def data_push(input_path: Path, recipe: str, local: bool, workdir: Path | None) -> None:
    """Upload training data to the recipe's bucket under its content key (never twice); prints
    the DATA_PATH a run reads it at. `train` does this itself for a data.path that is a file."""
    from vicuna_sky.launch import data_push as push_lib
    from vicuna_sky.launch.runner import load_recipe
    from vicuna_sky.localcloud.cluster import LocalConfig

    r = load_recipe(recipe)
    conversations = push_lib.check_format(input_path)
    if local:
        root = workdir / "buckets" if workdir else None
        runs = workdir / "runs" if workdir else Path("runs")
        bucket = str(LocalConfig(runs_dir=runs, bucket_root=root).bucket_dir(r.bucket))
    else:
        bucket = r.bucket
    pushed = push_lib.push(input_path, bucket)
    where = f" (the local folder {bucket})" if local else ""
    console.print(f"{push_lib.describe(pushed, r.bucket)}{where}; {conversations} conversations")
    console.print(
        f"train on it: --env DATA_PATH={pushed.key} (a held-out set: --env EVAL_PATH=...; or "
        "set data.path / data.eval_path to the file)"
    )
