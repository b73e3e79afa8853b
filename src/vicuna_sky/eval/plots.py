"""Showing an evaluation report: rich tables for the terminal, a JSON document, PNG figures;
and a training run's loss curve, drawn the same way.

Figures are `matplotlib.figure.Figure` objects made directly, without pyplot: no display, no
global backend or figure registry to manage, and a figure is freed when it goes out of scope.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.eval.report import Report
from vicuna_sky.output import write_text, writing

DPI = 120
PLOT_FILES = ("relative_quality.png", "scores_by_category.png", "win_tie_loss.png")
"""What `draw_plots` may write, so a command can check the places before it starts."""


def ranked(report: Report) -> list[str]:
    """Model names, best relative quality first; those without one last, by name."""
    rel = {m: s.relative for m, s in report.models.items()}
    return sorted(rel, key=lambda m: (rel[m] is None, -(rel[m] or 0.0), m))


def _rounded(x: object) -> object:
    """JSON-ready, floats to 4 decimals (0.9206 reads as 92.06 %)."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {str(k): _rounded(v) for k, v in x.items()}
    return [_rounded(v) for v in x] if isinstance(x, list | tuple) else x


def report_json(report: Report) -> dict:
    """The report as JSON: models best first, each with `relative` (a fraction of the reference)."""
    out = asdict(report)
    out["models"] = {
        name: out["models"][name] | {"win_rate": report.models[name].win_rate}
        for name in ranked(report)
    }
    for pair, p in zip(out["pairs"], report.pairs, strict=True):
        pair |= {"games": p.games, "position_bias": p.position_bias}
    return _rounded(out)


def write_json(report: Report, path: Path | str) -> Path:
    """Atomically; the caller checked the place (`vicuna_sky.output.check_output_file`)."""
    try:  # NaN is not JSON: a reader would reject the whole file
        text = json.dumps(report_json(report), indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise VicunaSkyError(f"{path}: the report has a number JSON cannot hold ({e})") from None
    return write_text(Path(path), text)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report_tables(report: Report) -> list[Table]:
    """Per model (best first), mean score by category, and the pairs when there were games."""
    names = ranked(report)
    turns = sorted({t for s in report.models.values() for t in s.turns})
    turns = turns if len(turns) > 1 else []  # one turn: the overall column says it all
    summary = Table(
        title=f"Quality relative to {report.reference}",
        caption=f"judged by {', '.join(report.judges) or 'nobody'}; from {report.kind}",
    )
    columns = ["model", "relative", "overall", *(f"turn {t}" for t in turns), "grades"]
    for column in [*columns, "W/T/L", "win rate", "failures"]:
        summary.add_column(column, justify="left" if column == "model" else "right")
    for name in names:
        s = report.models[name]
        summary.add_row(
            name,
            _pct(s.relative),
            _num(s.overall),
            *(_num(s.turns.get(t)) for t in turns),
            str(s.n_scores),
            f"{s.wins}/{s.ties}/{s.losses}",
            _pct(s.win_rate),
            str(s.failures),
        )
    tables = [summary]
    if report.categories:
        by_category = Table(title="Mean score by category")
        by_category.add_column("category")
        for name in names:
            by_category.add_column(name, justify="right")
        for c in report.categories:
            by_category.add_row(c, *(_num(report.models[n].categories.get(c)) for n in names))
        tables.append(by_category)
    if report.pairs:
        pairs = Table(title="Pairs", caption="inconsistent: the verdict flipped with the order")
        for column in ["A", "B", "games", "A wins", "ties", "B wins", "inconsistent", "failures"]:
            pairs.add_column(column, justify="left" if len(column) == 1 else "right")
        for p in report.pairs:
            bias = f"{p.inconsistent} ({_pct(p.position_bias)})"
            counts = (p.games, p.wins_a, p.ties, p.wins_b)
            pairs.add_row(p.model_a, p.model_b, *map(str, counts), bias, str(p.failures))
        tables.append(pairs)
    return tables


def render_report(report: Report, console: Console) -> None:
    for table in report_tables(report):
        console.print(table)
    for name in ranked(report):
        if report.models[name].relative is None:
            note = f"{name}: no relative quality ({report.models[name].relative_note})"
            console.print(escape(note), style="yellow")
    for note in report.notes:
        console.print(f"note: {escape(note)}", style="yellow")


def draw_plots(report: Report, directory: Path | str) -> list[Path]:
    """Write the figures the report has data for into `directory`; return their paths."""
    directory = Path(directory)
    drawers = (plot_relative_quality, plot_scores_by_category, plot_win_tie_loss)
    written = []
    for filename, draw in zip(PLOT_FILES, drawers, strict=True):
        figure = draw(report)
        if figure is not None:
            written.append(save_figure(figure, directory / filename))
    return written


def save_figure(figure: Figure, path: Path) -> Path:
    """A figure as a PNG, written atomically."""
    with writing(Path(path)) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")
    return Path(path)


def _judged_by(report: Report) -> str:
    return textwrap.fill(f"judged by {', '.join(report.judges)}", 90)


def plot_relative_quality(report: Report) -> Figure | None:
    """Horizontal bars: each model's total score as a % of the reference's (the blog's figure)."""
    names = [n for n in reversed(ranked(report)) if report.models[n].relative is not None]
    if len(names) < 2:
        return None
    values = [100 * report.models[n].relative for n in names]
    fig = Figure(figsize=(8, 1.6 + 0.55 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#9e9e9e" if n == report.reference else "#3b75af" for n in names]
    bars = ax.barh(names, values, color=colors, height=0.6)
    for text in ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=4, fontsize=10):
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 1})  # over the 100 % line
    ax.axvline(100, color="#555555", linestyle="--", linewidth=1)
    ax.set_xlim(0, max(115, max(values) * 1.15))
    ax.set_xlabel(f"total score as % of {report.reference}'s")
    ax.set_title(f"Relative response quality vs {report.reference}", fontweight="bold")
    ax.tick_params(axis="y", labelsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    missing = [n for n in report.models if report.models[n].relative is None]
    footer = _judged_by(report) + (f"\nno relative score: {', '.join(missing)}" if missing else "")
    fig.supxlabel(footer, fontsize=8, color="#555555")
    return fig


def plot_scores_by_category(report: Report) -> Figure | None:
    """Grouped bars: each model's mean score (1-10) in each category, and overall."""
    names = [n for n in ranked(report) if report.models[n].n_scores]
    if not names or not report.categories:
        return None
    groups = [*report.categories, "overall"]
    width = 0.8 / len(names)
    inches = min(18, max(8, 2 + 0.22 * len(groups) * (len(names) + 1)))
    fig = Figure(figsize=(inches, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        s = report.models[name]
        heights = [s.categories.get(c, 0.0) for c in report.categories] + [s.overall or 0.0]
        positions = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(positions, heights, width=width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylim(0, 10.5)
    ax.set_ylabel("mean score (1-10)")
    ax.set_title("Mean score by category", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(ncols=min(len(names), 5), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.supxlabel(_judged_by(report), fontsize=8, color="#555555")
    return fig


def plot_win_tie_loss(report: Report) -> Figure | None:
    """Stacked bars per pair: the share of games A won, tied (incl. inconsistent) and lost."""
    pairs = [p for p in report.pairs if p.games]
    if not pairs:
        return None
    fig = Figure(figsize=(8, 1.6 + 0.55 * len(pairs)), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{p.model_a} vs {p.model_b}" for p in pairs]
    left = [0.0] * len(pairs)
    for part, color in (("wins_a", "#4c9a5b"), ("ties", "#bdbdbd"), ("wins_b", "#c8553d")):
        counts = [getattr(p, part) for p in pairs]
        shares = [100 * c / p.games for c, p in zip(counts, pairs, strict=True)]
        label = {"wins_a": "A wins", "ties": "tie or inconsistent", "wins_b": "B wins"}[part]
        bars = ax.barh(labels, shares, left=left, color=color, height=0.6, label=label)
        texts = [str(c) if s >= 6 else "" for c, s in zip(counts, shares, strict=True)]
        ax.bar_label(bars, labels=texts, label_type="center", fontsize=9)
        left = [a + s for a, s in zip(left, shares, strict=True)]
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel("% of games (A is the first model)")
    ax.set_title("Win / tie / loss per pair", fontweight="bold")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.supxlabel(_judged_by(report), fontsize=8, color="#555555")
    return fig


def plot_loss_curve(
    train: list[tuple[float, float]],
    evals: list[tuple[float, float]],
    resumes: list[float],
    title: str = "Training loss",
) -> Figure | None:
    """Train and eval loss (y) against tokens trained on (x); a dashed line where a recovered
    attempt resumed (a preemption or a restart). Points are (tokens, loss)."""
    if not train and not evals:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if train:
        xs, ys = zip(*train, strict=True)
        ax.plot(xs, ys, color="#3b75af", linewidth=1.2, label="train loss")
    if evals:
        xs, ys = zip(*evals, strict=True)
        ax.plot(xs, ys, color="#c8553d", marker="o", linewidth=1.5, label="eval loss (held out)")
        first, last = evals[0][1], evals[-1][1]
        for x, y in (evals[0], evals[-1]) if len(evals) > 1 else (evals[0],):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=9)
        if len(evals) > 1:
            title += f" (eval {first:.3f} -> {last:.3f})"
    for i, x in enumerate(resumes):
        ax.axvline(x, color="#555555", linestyle="--", linewidth=1, label=None if i else "resumed")
    ax.set_xlabel("tokens trained on")
    ax.set_ylabel("loss per answer token")
    ax.set_title(title, fontweight="bold")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False)
    return fig


def save_loss_curve(history: object, path: Path | str) -> Path | None:
    """The loss curve of a run's history (`vicuna_sky.train.metrics.History`: the work the
    final model kept, with every resume marked) as a PNG; None when there is nothing to draw."""
    train, evals, resumes = history.kept()
    figure = plot_loss_curve(
        [(r["tokens_seen"], r["loss"]) for r in train],
        [(r["tokens_seen"], r["eval_loss"]) for r in evals],
        resumes,
    )
    return None if figure is None else save_figure(figure, Path(path))
