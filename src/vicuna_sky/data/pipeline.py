"""File-level data commands: read a ShareGPT file, run a stage, write atomically, summarise.

Used by `vicuna-sky data ...` and the demo. Malformed samples are listed (first few) on stderr
and counted; the good samples always reach the output.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from vicuna_sky.data import clean as clean_lib
from vicuna_sky.data import sharegpt
from vicuna_sky.data import split as split_lib
from vicuna_sky.data.conversation import get_template
from vicuna_sky.data.sharegpt import Problem, Report
from vicuna_sky.data.tokenize import Tokenized, tokenize_sample
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.output import check_output_file, write_text
from vicuna_sky.terminal import make_console

console = make_console()
err_console = make_console(stderr=True)
SHOWN_PROBLEMS = 10


def _read(path: Path) -> tuple[list[dict], list[Problem]]:
    samples, problems = sharegpt.load(path)
    if problems and not samples:
        raise VicunaSkyError(
            f"{path}: none of its {len(problems)} samples is well-formed (first: {problems[0]})"
        )
    return samples, problems


def _report_problems(problems: list[Problem], quiet: bool) -> None:
    if quiet:
        return
    for problem in problems[:SHOWN_PROBLEMS]:
        err_console.print(f"[yellow]skipped[/] {problem}", highlight=False, soft_wrap=True)
    if len(problems) > SHOWN_PROBLEMS:
        err_console.print(f"[yellow]... and {len(problems) - SHOWN_PROBLEMS} more skipped[/]")


def _summary(title: str, total: int, counts: Counter, order: tuple[str, ...], out: int) -> None:
    console.print(title, highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("rule")
    table.add_column("samples", justify="right")
    table.add_row("input", str(total))
    for rule in order:
        if counts.get(rule):
            table.add_row(rule, str(counts[rule]))
    table.add_row("[bold]output[/]", f"[bold]{out}[/]")
    console.print(table)


def _run(
    src: Path,
    dst: Path,
    stage: Callable[[list[dict]], Report],
    title: str,
    rules: tuple[str, ...],
    quiet: bool,
    overwrite: bool,
    inputs: tuple[str, ...] = (),
) -> Report:
    # Before any work: the output is never an input, nor an existing file unless asked.
    check_output_file(dst, [src, *inputs], overwrite=overwrite)
    samples, problems = _read(src)
    report = stage(samples)
    report.counts["malformed"] += len(problems)
    report.problems = problems + report.problems
    sharegpt.write(report.samples, dst)
    _report_problems(report.problems, quiet)
    if not quiet:
        total = len(samples) + len(problems)
        order = tuple(dict.fromkeys(("malformed", *rules)))
        _summary(title, total, report.counts, order, len(report.samples))
    return report


def clean_file(
    src: Path,
    dst: Path,
    config: clean_lib.CleanConfig,
    quiet: bool = False,
    overwrite: bool = False,
    dropped: Path | None = None,
) -> Report:
    """`dropped`: also write the id and rule of every conversation a filter left out (JSONL)."""
    if dropped is not None:
        check_output_file(dropped, [src, dst], overwrite=overwrite)
    report = _run(
        src,
        dst,
        lambda samples: clean_lib.clean(samples, config, show_progress=not quiet),
        f"cleaned {src} -> {dst}",
        clean_lib.RULES,
        quiet,
        overwrite,
    )
    if dropped is not None:
        lines = (json.dumps({"id": i, "rule": rule}) + "\n" for i, rule in report.dropped)
        write_text(dropped, "".join(lines))
        if not quiet:
            console.print(f"dropped ids: {dropped} ({len(report.dropped)})")
    return report


def split_file(
    src: Path,
    dst: Path,
    config: split_lib.SplitConfig,
    quiet: bool = False,
    overwrite: bool = False,
    eval_dst: Path | None = None,
) -> Report:
    """`eval_dst`: where the held-out conversations go (needed when config holds some out)."""
    holding_out = bool(config.eval_count or config.eval_fraction)
    if holding_out and eval_dst is None:
        raise VicunaSkyError("a held-out split needs a file for the eval set (--eval-output)")
    if holding_out:
        check_output_file(eval_dst, [src, dst, config.tokenizer], overwrite=overwrite)
    report = _run(
        src,
        dst,
        lambda samples: split_lib.split(samples, config, show_progress=not quiet),
        f"split {src} -> {dst} (max {config.max_length} tokens, {config.template})",
        (
            "conversations_split",
            "rounds_truncated",
            "rounds_dropped",
            "conversations_dropped",
            "ids_renamed",
            "conversations_held_out",
        ),
        quiet,
        overwrite,
        inputs=(config.tokenizer,),  # a tokenizer directory (or file) is read too
    )
    if holding_out:
        sharegpt.write(report.held_out, eval_dst)
        if not quiet:
            console.print(
                f"held out for evaluation: {report.counts['conversations_held_out']} "
                f"conversations, {len(report.held_out)} segments -> {eval_dst}",
                highlight=False,
                soft_wrap=True,
            )
    return report


def eval_path_for(dst: Path) -> Path:
    """The default eval file of a split written to `dst`: X.json -> X.eval.json, beside it."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem}.eval{dst.suffix or '.json'}")


STATS_VERSION = 1


@dataclass
class Stats:
    samples: int
    tokens: int
    trainable_tokens: int
    longest: int
    over_max_length: int
    packs: int = 0
    """Sequences the trainer makes with packing on (greedy, in file order, as `pack`)."""
    max_length: int = 0
    tokenizer: str = ""
    template: str = ""
    data_bytes: int = 0
    """Size of the data file counted: a plan ignores stats of a file that has changed since."""


def stats_path(data: Path) -> Path:
    """Where the stats of a data file live: X.json -> X.stats.json, beside it."""
    data = Path(data)
    return data.with_name(f"{data.stem}.stats.json")


def pack_count(lengths: list[int], max_length: int) -> int:
    """How many sequences `tokenize.pack` makes of samples of these lengths (its greedy rule,
    without building them: a plan needs the count, not 90M token ids in memory)."""
    packs, fill = 0, 0
    for length in lengths:
        n = min(length, max_length)
        if n == 0:
            continue
        if fill and fill + n > max_length:
            packs, fill = packs + 1, 0
        fill += n
    return packs + (fill > 0)


def stats_file(src: Path, tokenizer: str, template: str, max_length: int) -> Stats:
    """Tokens per epoch as the trainer sees them: what a recipe's `data.tokens` should say."""
    if max_length < 1:
        raise VicunaSkyError(f"--max-length must be at least 1, not {max_length}")
    samples, problems = _read(src)
    _report_problems(problems, quiet=False)
    tok = split_lib.load_tokenizer(tokenizer)
    tpl = get_template(template, tok)
    stats = Stats(len(samples), 0, 0, 0, 0, max_length=max_length)
    stats.tokenizer, stats.template = str(tokenizer), template
    stats.data_bytes = Path(src).stat().st_size
    lengths = []
    for sample in samples:
        t = tokenize_sample(sample, tpl, tok)
        n = len(t.input_ids)
        lengths.append(n)
        stats.tokens += min(n, max_length)
        stats.trainable_tokens += Tokenized(t.input_ids, t.labels[:max_length]).trainable
        stats.longest = max(stats.longest, n)
        stats.over_max_length += n > max_length
    stats.packs = pack_count(lengths, max_length)
    return stats


def write_stats(stats: Stats, data: Path) -> Path:
    """The stats beside the data they count (replacing older ones: they describe the file as
    it is now), for `vicuna-sky plan` to read."""
    import json
    from dataclasses import asdict

    from vicuna_sky.output import write_text

    target = check_output_file(stats_path(data), [data, stats.tokenizer], overwrite=True)
    record = {"version": STATS_VERSION, "data": Path(data).name, **asdict(stats)}
    return write_text(target, json.dumps(record, indent=2) + "\n")


def read_stats(path: Path) -> Stats:
    """A stats file, checked: a broken one is a one-line error naming it."""
    import json
    from dataclasses import fields

    try:
        record = json.loads(Path(path).read_text())
        if record.get("version") != STATS_VERSION:
            raise ValueError(f"version {record.get('version')!r}, expected {STATS_VERSION}")
        names = {f.name for f in fields(Stats)}
        stats = Stats(**{k: v for k, v in record.items() if k in names})
        if not all(isinstance(getattr(stats, n), int) for n in ("samples", "tokens", "packs")):
            raise ValueError("samples, tokens and packs must be integers")
        if stats.tokens <= 0 or stats.samples <= 0:
            raise ValueError("no tokens counted")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise VicunaSkyError(f"cannot read data stats {path}: {e}") from None
    return stats
