"""`vicuna-sky eval`: answer a benchmark, judge the answers, report; or launch sky/eval.yaml."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from vicuna_sky.cli.app import Finite, app, console
from vicuna_sky.cli.launch import ANY_CLOUD, launch, launch_options
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.output import OVERWRITE_HELP, check_output_file

QUESTIONS_HELP = "Question file in FastChat's format (`turns` or legacy `text`), or `demo`."
KEY_HELP = "Bearer key [$OPENAI_API_KEY]."
PATH = click.Path(path_type=Path)


def REQUEST_OPTIONS(fn: click.decorators.FC) -> click.decorators.FC:
    fn = click.option(
        "--backoff",
        type=Finite(0),
        default=1.0,
        show_default=True,
        help="Seconds before the first retry of a failed request; doubled each time.",
    )(fn)
    fn = click.option(
        "--concurrency",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Requests in flight at once.",
    )(fn)
    return click.option(
        "--retries",
        type=click.IntRange(min=0),
        default=5,
        show_default=True,
        help="Retries of a failed request.",
    )(fn)


@app.group(name="eval")
def eval_() -> None:
    """Evaluate with an LLM judge: answer, judge, report (or launch it all with sky/eval.yaml)."""


@eval_.command(name="launch")
@launch_options
@ANY_CLOUD
def eval_launch(**options: object) -> None:
    """sky/eval.yaml: the trained model answers the benchmark and an LLM judges the answers."""
    launch("EVAL", **options)


def _fail_if(failed: dict, total: int, what: str) -> None:
    if failed:
        first_key, first = next(iter(failed.items()))
        raise VicunaSkyError(
            f"{len(failed)} of {total} {what} failed (first, {first_key}: {first}); "
            "rerun the same command to resume"
        )


@eval_.command(name="answer")
@click.option("--questions", required=True, help=QUESTIONS_HELP)
@click.option("--model", required=True, help="Model name the endpoint serves.")
@click.option("--base-url", default=None, help="OpenAI-compatible API, e.g. http://host:8000/v1.")
@click.option(
    "--api-key", envvar="OPENAI_API_KEY", default=None, help="Bearer key [$OPENAI_API_KEY]."
)
@click.option(
    "--serve",
    "serve_path",
    default=None,
    help="Instead of --base-url: serve this model path on 127.0.0.1 (a controller and one "
    "worker) for the run.",
)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--template", default="vicuna_v1.1", show_default=True, help="With --serve.")
@click.option("-o", "--output", type=PATH, required=True, help="Answers JSONL (resumed).")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=1024, show_default=True, help="Per turn."
)
@click.option(
    "--temperature",
    type=Finite(0, 2),
    default=None,
    help="One temperature instead of per category.",
)
@REQUEST_OPTIONS
def eval_answer(
    questions: str,
    model: str,
    base_url: str | None,
    api_key: str | None,
    serve_path: str | None,
    backend: str,
    template: str,
    output: Path,
    concurrency: int,
    max_tokens: int,
    temperature: float | None,
    retries: int,
    backoff: float,
) -> None:
    """Answer every question, turn after turn, through an OpenAI-compatible endpoint."""
    from vicuna_sky.eval.answer import AnswerConfig, answer_questions
    from vicuna_sky.eval.client import Endpoint
    from vicuna_sky.eval.questions import load_questions

    if (base_url is None) == (serve_path is None):
        raise VicunaSkyError("give either --base-url or --serve")
    # Its own record is resumed (checked before anything is appended); an input never is.
    check_output_file(output, [questions], resumable=True)
    items = load_questions(questions)
    config = AnswerConfig(
        output,
        max_tokens=max_tokens,
        temperature=temperature,
        concurrency=concurrency,
        retries=retries,
        backoff=backoff,
    )
    with ExitStack() as stack:
        if serve_path is not None:
            logs = output.parent / f".fleet-{model}"
            served = _served(serve_path, model, backend, template, logs)
            base_url = stack.enter_context(served)
        endpoint = Endpoint(base_url, model, api_key)
        summary = asyncio.run(answer_questions(items, endpoint, config))
    console.print(
        f"{summary.answered} answered, {summary.skipped} already in {output}, "
        f"{len(summary.failed)} failed",
        markup=False,
    )
    _fail_if(summary.failed, len(items), "questions")


@contextmanager
def _served(model_path: str, name: str, backend: str, template: str, logs: Path) -> Iterator[str]:
    """A controller and one worker on 127.0.0.1 serving `model_path` as `name`; yields the API.
    Their logs go to `logs`."""
    from vicuna_sky.serve.local_fleet import FleetError, LocalFleet

    # The fleet is stopped on every way out: an error, Ctrl-C, SIGTERM (see cli.main).
    with LocalFleet(logs) as fleet:
        try:
            fleet.start_controller()
            worker = fleet.start_worker(backend, model_path, name, "--template", template)
            fleet.wait_workers({worker}, timeout=600)
        except (FleetError, TimeoutError) as e:
            raise VicunaSkyError(f"cannot serve {model_path}: {e}") from None
        yield f"{fleet.url}/v1"


@eval_.command(name="judge")
@click.option("--mode", type=click.Choice(["single", "pairwise"]), required=True)
@click.option("--questions", required=True, help=QUESTIONS_HELP)
@click.option("--reference-answers", type=PATH, default=None, help="Answers JSONL of a reference.")
@click.option("--answers", type=PATH, multiple=True, required=True, help="Answers JSONL (repeat).")
@click.option("--model", "models", multiple=True, help="Models to judge (default: all answers).")
@click.option("--baseline", default=None, help="pairwise: compare each model with this one.")
@click.option("--judge-model", required=True)
@click.option("--judge-base-url", default=None, help="OpenAI-compatible API of the judge.")
@click.option(
    "--judge-serve",
    default=None,
    help="Instead of --judge-base-url: serve this model path on 127.0.0.1 as the judge.",
)
@click.option("--template", default="vicuna_v1.1", show_default=True, help="With --judge-serve.")
@click.option("--judge-api-key", envvar="OPENAI_API_KEY", default=None, help=KEY_HELP)
@click.option("--judge-prompts", type=PATH, default=None, help="Prompts JSONL (FastChat format).")
@click.option("-o", "--output", type=PATH, required=True, help="Judgments JSONL (resumed).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Most tokens per judgment.",
)
@REQUEST_OPTIONS
@click.option("--redo-failed", is_flag=True, help="Judge again what had no readable verdict.")
@click.option(
    "--guided-choice/--no-guided-choice",
    default=None,
    help="Ask for the verdict as one of its allowed strings (vLLM's guided_choice; our fleet "
    "has it). Default: on with --judge-serve, off for other endpoints.",
)
def eval_judge(
    mode: str,
    questions: str,
    reference_answers: Path | None,
    answers: tuple[Path, ...],
    models: tuple[str, ...],
    baseline: str | None,
    judge_model: str,
    judge_base_url: str | None,
    judge_serve: str | None,
    template: str,
    judge_api_key: str | None,
    judge_prompts: Path | None,
    output: Path,
    max_tokens: int,
    concurrency: int,
    retries: int,
    backoff: float,
    redo_failed: bool,
    guided_choice: bool | None,
) -> None:
    """Grade answers (single) or compare them in both orders (pairwise) with an LLM judge."""
    from vicuna_sky.eval.client import Endpoint
    from vicuna_sky.eval.judge import JudgeConfig, judge, load_answers
    from vicuna_sky.eval.prompts import load_prompts
    from vicuna_sky.eval.questions import load_questions

    inputs = [questions, reference_answers, *answers, judge_prompts]
    check_output_file(output, inputs, resumable=True)
    items = load_questions(questions, reference_answers)
    by_model = load_answers(list(answers))
    chosen = list(models) or [m for m in by_model if m != baseline]
    config = JudgeConfig(
        mode,
        output,
        baseline=baseline,
        max_tokens=max_tokens,
        concurrency=concurrency,
        retries=retries,
        backoff=backoff,
        redo_failed=redo_failed,
        # A model served here for want of a judge endpoint: the report should say so.
        judge_label=f"{judge_model} (local model)" if judge_serve else None,
        guided_choice=judge_serve is not None if guided_choice is None else guided_choice,
    )
    if (judge_base_url is None) == (judge_serve is None):
        raise VicunaSkyError("give either --judge-base-url or --judge-serve")
    with ExitStack() as stack:
        if judge_serve is not None:
            where = output.parent / f".fleet-judge-{judge_model}"
            served = _served(judge_serve, judge_model, "hf", template, where)
            judge_base_url = stack.enter_context(served)
        endpoint = Endpoint(judge_base_url, judge_model, judge_api_key)
        summary = judge(items, by_model, chosen, endpoint, load_prompts(judge_prompts), config)
    console.print(
        f"{summary.judged} judged ({summary.unparsed} without a readable verdict), "
        f"{summary.skipped} already in {output}, {len(summary.failed)} failed, "
        f"{summary.requests} requests",
        markup=False,
    )
    _fail_if(summary.failed, summary.judged + len(summary.failed), "judgments")


@eval_.command(name="report")
@click.option("--judgments", type=PATH, multiple=True, help="Judgments JSONL (repeatable).")
@click.option(
    "--legacy-reviews",
    type=PATH,
    default=None,
    help="A directory of FastChat's review_<a>_<b>.jsonl files (the original Vicuna eval).",
)
@click.option("--questions", type=PATH, default=None, help="Question file for the categories.")
@click.option(
    "--reference", required=True, help="The model every other is measured against (its 100 %)."
)
@click.option("--json", "json_path", type=PATH, default=None, help="Write the report as JSON.")
@click.option("--plots", type=PATH, default=None, help="Directory for the PNG plots.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def eval_report(
    judgments: tuple[Path, ...],
    legacy_reviews: Path | None,
    questions: Path | None,
    reference: str,
    json_path: Path | None,
    plots: Path | None,
    overwrite: bool,
) -> None:
    """Scores by category, win/tie/loss and quality relative to a reference, with plots."""
    from vicuna_sky.eval.plots import PLOT_FILES, draw_plots, render_report, write_json
    from vicuna_sky.eval.report import build_report

    inputs = [*judgments, legacy_reviews, questions]
    outputs = [json_path] if json_path is not None else []
    if plots is not None:
        if plots.exists() and not plots.is_dir():
            raise VicunaSkyError(f"--plots {plots} is a file, not a directory")
        outputs += [plots / name for name in PLOT_FILES]
    for path in outputs:
        check_output_file(path, inputs, overwrite=overwrite)
    report = build_report(
        reference, judgments=judgments, legacy_reviews=legacy_reviews, questions=questions
    )
    render_report(report, console)
    if json_path is not None:
        console.print(f"report: {write_json(report, json_path)}", markup=False)
    if plots is not None:
        for path in draw_plots(report, plots):
            console.print(f"plot: {path}", markup=False)
