"""`vicuna-sky demo`: the pipeline on a CPU recipe, on this machine.

The default recipe (`smollm2-cpu`) fine-tunes a real small model, SmolLM2-135M-Instruct, with
LoRA; `--recipe tiny-cpu` runs the same stages on a random tiny Llama in a fraction of the time.
Stages run in order and each says what it produced: prepare the model, validate specs, clean +
split data, train (preempted once, resumed from the bucket), serve (a local fleet asked through
the OpenAI API), evaluate (sky/eval.yaml: answers, a judge, a report with plots), and the Vicuna
blog's chart drawn from the published GPT-4 reviews. The summary shows what ran and where.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.tasks import Spec, load_task, resolve_recipe
from vicuna_sky.localcloud.cluster import LocalConfig
from vicuna_sky.localcloud.loopback import stay_on_loopback
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

console = make_console()
RECIPE = "smollm2-cpu"
KEEP = ("models",)
"""Kept when the demo runs again in its directory: converting SmolLM2 takes half a minute."""


@dataclass
class Context:
    workdir: Path
    recipe: Recipe
    local: LocalConfig
    outputs: dict[str, str]
    data_envs: dict[str, str] = field(default_factory=dict)
    """DATA_PATH / EVAL_PATH: the uploaded sample's objects in the bucket."""

    @property
    def bucket_dir(self) -> Path:
        scheme, _, rest = self.recipe.bucket.partition("://")
        return Path(self.local.bucket_root or self.workdir / "buckets") / scheme / rest


@dataclass
class Stage:
    name: str
    fn: Callable[[Context], str]


def stage_assets(ctx: Context) -> str:
    """The recipe's built-in model, made once and kept in `models/` across reruns."""
    from vicuna_sky.models import SMOLLM2, resolve_model_path

    name = ctx.recipe.model.path
    cached = (ctx.workdir / "models" / name / "config.json").exists()
    model_dir = resolve_model_path(name, ctx.workdir / "models")
    if model_dir == name:
        raise VicunaSkyError(f"the demo runs a built-in model; {ctx.recipe.source} names {name}")
    ctx.outputs["model"] = model_dir
    what = (
        "SmolLM2-135M-Instruct, converted from the packaged GGUF to safetensors"
        if name == SMOLLM2
        else "tiny Llama (random weights) + tokenizer built"
    )
    return f"{what}{' (cached)' if cached else ''} in {model_dir}"


def stage_data(ctx: Context) -> str:
    """Clean the packaged HTML sample, split it to the recipe's context (demo-sample, made once
    per setting), and upload it to the bucket by content, as `train` uploads a user's file."""
    from vicuna_sky.launch import data_push
    from vicuna_sky.tiny import builtin_data

    r = ctx.recipe
    train, held_file, stats = builtin_data(
        ctx.workdir / "data",
        r.data.max_length,
        r.model.template,
        ctx.outputs["model"],
        r.data.eval_fraction,
    )
    for env, source in (("DATA_PATH", train), ("EVAL_PATH", held_file)):
        if source is not None:
            ctx.data_envs[env] = data_push.push(source, str(ctx.bucket_dir)).key
    ctx.outputs["data"] = str(ctx.bucket_dir / ctx.data_envs["DATA_PATH"])
    removed = ", ".join(f"{n} {rule}" for rule, n in stats["removed"].items())
    held = ""
    if stats["held_out"]:
        ctx.outputs["eval data"] = str(ctx.bucket_dir / ctx.data_envs["EVAL_PATH"])
        held = (
            f"; {stats['held_out']} whole conversations ({stats['held_out_segments']} segments) "
            "held out for the eval loss"
        )
    return (
        f"{stats['kept']} of {stats['conversations']} conversations kept ({removed}); "
        f"{stats['segments']} segments of <= {r.data.max_length} tokens to train on "
        f"({r.model.template}); "
        f"{stats['tokens']} tokens, {stats['trainable_tokens']} trained on{held}; in the bucket"
    )


def stage_train(ctx: Context) -> str:
    """sky/train.yaml on the local backend, preempted once after its first committed checkpoint:
    the relaunch (a fresh directory, another "zone") resumes from the bucket."""
    from checkpoints_sync import Checkpoints, open_store
    from vicuna_sky.launch.runner import fresh_tag
    from vicuna_sky.localcloud.backend import fetch_export
    from vicuna_sky.localcloud.cluster import LocalRunner

    # A fresh RUN_TAG: the demo shows a run from step 0, not a resume of an earlier demo's.
    overrides = {"MODEL_PATH": ctx.outputs["model"], "RUN_TAG": fresh_tag(), **ctx.data_envs}
    task = load_task(Spec.TRAIN, ctx.recipe, overrides)
    task.name = f"{ctx.recipe.name}-train"
    runner = LocalRunner(task, ctx.local)
    run_name = task.envs["RUN_NAME"]
    # Where sky/train.yaml commits them (tasks.checkpoint_url), in the local bucket.
    checkpoints = Checkpoints(
        open_store(f"file://{ctx.bucket_dir}/runs/{run_name}/{task.envs['RUN_TAG']}")
    )
    preempted: list[int] = []

    def preempt_once() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and runner.job.status not in ("SUCCEEDED", "FAILED"):
            step = checkpoints.latest()
            if step and runner.preempt(grace_seconds=30):  # SIGTERM, then SIGKILL
                preempted.append(step)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=preempt_once, daemon=True)
    watcher.start()
    job = runner.run()
    watcher.join(timeout=5)
    if job.status != "SUCCEEDED":
        raise VicunaSkyError(f"demo training ended {job.status}: see {job.run_dir}")
    export = ctx.workdir / "export"
    fetch_export(ctx.bucket_dir, run_name, export)
    ctx.outputs["export"] = str(export)
    ctx.outputs["train logs"] = str(job.run_dir)
    what = (
        f"preempted after step {preempted[0]}, relaunched in a fresh zone and resumed from the "
        "bucket"
        if preempted
        else "finished before the preemption could land"
    )
    held_out = held_out_losses(ctx, job.metrics_url)
    return f"{len(job.attempts)} attempt(s): {what}; model exported to {export}{held_out}"


def held_out_losses(ctx: Context, url: str) -> str:
    """The held-out loss of the base model (the trainer's eval before its first step) and of
    the fine-tuned one (after its last), from the run's metrics in the bucket; the loss curve
    the trainer drew there."""
    from vicuna_sky.train.metrics import LOSS_CURVE, history

    _, evals, _ = history(url).kept()
    if "EVAL_PATH" not in ctx.data_envs or len(evals) < 2 or evals[0]["step"] != 0:
        return ""
    base, tuned = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    ctx.outputs["held-out loss"] = f"base {base:.4f} -> fine-tuned {tuned:.4f}"
    curve = Path(url.removeprefix("file://")) / LOSS_CURVE
    if curve.exists():
        ctx.outputs["loss curve"] = str(curve)
    return (
        f"; held-out loss (mean per answer token, {evals[-1]['eval_tokens']} tokens): base "
        f"{base:.4f} -> fine-tuned {tuned:.4f} ({(tuned - base) / base:+.1%}); loss curve "
        f"{curve.name} beside the checkpoints"
    )


def stage_specs(ctx: Context) -> str:
    checked = []
    for spec in Spec:
        extra = {"CONTROLLER_URL": "http://127.0.0.1:8000"} if spec is Spec.WORKER else {}
        load_task(spec, ctx.recipe, extra)
        checked.append(spec.value)
    return f"{len(checked)} specs resolved and validated by SkyPilot: {', '.join(checked)}"


def stage_serve(ctx: Context) -> str:
    """The exported model behind a local fleet (controller + 2 hf workers), asked through the
    OpenAI API with the official client; the summary quotes one answer."""
    from vicuna_sky.serve.local_fleet import LocalFleet

    export = ctx.outputs["export"]
    name = ctx.recipe.serve.model_name
    questions = ["What is the capital of France?", "What is a spot instance?", "Say hello."]
    template = ("--template", ctx.recipe.model.template)
    with LocalFleet(ctx.workdir / "serve") as fleet:
        fleet.start_controller()
        workers = {fleet.start_worker("hf", export, name, *template) for _ in range(2)}
        fleet.wait_workers(workers)
        client = fleet.client()
        answers = []
        for q in questions:
            r = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": q}],
                max_tokens=48,
                temperature=0,
            )
            answers.append((q, r.choices[0].message.content, r.usage.completion_tokens))
    ctx.outputs["serve logs"] = str(ctx.workdir / "serve")
    first, text, _ = answers[0]
    quoted = " ".join(text.split())
    return (
        f"controller + 2 hf workers; {len(answers)} questions answered through /v1/chat/"
        f"completions ({', '.join(str(n) for *_, n in answers)} tokens). "
        f'"{first}" -> "{quoted}"'
    )


def stage_evaluate(ctx: Context) -> str:
    """sky/eval.yaml on the local backend: the fine-tuned model and the base model answer the
    demo questions, a judge grades them (single and pairwise) and a report with plots is written.
    The judge is VICUNA_SKY_JUDGE_BASE_URL / VICUNA_SKY_JUDGE_MODEL when set, else the fine-tuned
    model itself with its verdicts constrained to the allowed strings (guided_choice): a smoke
    test of the machinery, not a quality measure."""
    import json

    from vicuna_sky.localcloud.cluster import LocalRunner

    envs = {"SERVE_MODEL_PATH": ctx.outputs["export"], "BASELINE_PATH": ctx.outputs["model"]}
    judge_url = os.environ.get("VICUNA_SKY_JUDGE_BASE_URL")
    if judge_url:
        envs |= {
            "JUDGE_API_BASE": judge_url,
            "JUDGE_MODEL": os.environ.get("VICUNA_SKY_JUDGE_MODEL", "gpt-4"),
        }  # OPENAI_API_KEY is a secret of the spec: load_task takes it from the environment
    task = load_task(Spec.EVAL, ctx.recipe, envs)
    task.name = f"{ctx.recipe.name}-eval"
    job = LocalRunner(task, ctx.local).run()
    if job.status != "SUCCEEDED":
        raise VicunaSkyError(f"demo evaluation ended {job.status}: see {job.run_dir}")
    out = ctx.bucket_dir / "eval" / task.envs["RUN_NAME"] / task.envs["BENCH"]
    report = json.loads((out / "report" / "report.json").read_text())
    ctx.outputs["eval report"] = str(out / "report")
    judge = (
        f"judge {task.envs['JUDGE_MODEL']} at {judge_url}"
        if judge_url
        else f"judge: the fine-tuned model itself ({task.envs['JUDGE_MODEL']}, no judge endpoint "
        "configured; verdicts constrained with guided_choice; a model this small as a judge is "
        "a smoke test of the machinery, not a quality measure)"
    )
    judgments = [
        json.loads(line)
        for path in sorted((out / "judgments").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    readable = sum(1 for j in judgments if not j.get("error"))
    answered = {
        path.stem: len(path.read_text().splitlines())
        for path in sorted((out / "answers").glob("*.jsonl"))
    }
    scores = ", ".join(
        f"{name} {m['overall']:.1f}/10" if m.get("overall") is not None else f"{name} n/a"
        for name, m in report["models"].items()
    )
    relative = ", ".join(
        f"{name} {m['relative']:.0%}" if m.get("relative") is not None else f"{name} n/a"
        for name, m in report["models"].items()
    )
    plots = sorted(p.name for p in (out / "report").glob("*.png"))
    return (
        f"answers to {', '.join(f'{n} questions from {m}' for m, n in answered.items())}; "
        f"{judge}: {readable} of {len(judgments)} verdicts readable; mean scores {scores}; "
        f"quality relative to {report['reference']}: {relative}; plots {', '.join(plots)}"
    )


def stage_blog(ctx: Context) -> str:
    """The Vicuna blog's headline chart from the published GPT-4 reviews (they ship with the
    package), drawn by the same report code: what a capable judge says about real models."""
    from vicuna_sky.assets import BLOG_REVIEWS
    from vicuna_sky.eval.plots import draw_plots, write_json
    from vicuna_sky.eval.report import build_report

    report = build_report("gpt35", legacy_reviews=BLOG_REVIEWS)
    out = ctx.workdir / "blog"
    draw_plots(report, out)
    write_json(report, out / "report.json")
    ctx.outputs["blog chart"] = str(out / "relative_quality.png")
    relative = ", ".join(
        f"{name} {m.relative:.0%}"
        for name, m in sorted(report.models.items(), key=lambda kv: kv[1].relative or 0)
        if m.relative is not None and name != report.reference
    )
    return f"response quality relative to ChatGPT (GPT-4 as judge): {relative}"


def stage_gguf(ctx: Context) -> str:
    """The fine-tuned model as one q8_0 GGUF file, the format llama.cpp runs on a laptop."""
    import json

    from vicuna_sky.gguf.export import export_gguf

    out = ctx.workdir / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    metadata = out / "metadata.json"  # llama.cpp's --metadata format: the model's name
    metadata.write_text(json.dumps({"general.name": f"{ctx.recipe.name} (vicuna-sky)"}))
    done = export_gguf(
        ctx.outputs["export"],
        out / f"{ctx.recipe.name}.q8_0.gguf",
        "q8_0",
        metadata=metadata,
        progress=False,
    )
    ctx.outputs["gguf"] = done["path"]
    return (
        f"{done['tensors']} tensors, {done['bytes'] / 2**20:.1f} MiB, tokenizer "
        f"{done['tokenizer']}; run it with: llama-cli -m {done['path']}"
    )


STAGES = [
    Stage("prepare", stage_assets),
    Stage("validate specs", stage_specs),
    Stage("clean + split data", stage_data),
    Stage("train (with a preemption)", stage_train),
    Stage("serve", stage_serve),
    Stage("evaluate", stage_evaluate),
    Stage("the Vicuna blog's chart", stage_blog),
    Stage("export to GGUF", stage_gguf),
]


def run(workdir: Path, recipe_name: str = RECIPE) -> None:
    # Nothing in the demo leaves this machine: SkyPilot's catalog (STS), metadata servers, the
    # hub and usage reporting all point at a closed loopback port, for this process and its
    # children.
    stay_on_loopback()
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / ".vicuna-demo").exists():
        raise VicunaSkyError(f"{workdir} is not empty and not a demo directory; pick another")
    recipe = Recipe.from_yaml(resolve_recipe(recipe_name))
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.iterdir():  # a previous demo's outputs; the converted model stays
        if old.name in KEEP:
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    (workdir / ".vicuna-demo").touch()
    local = LocalConfig(runs_dir=workdir / "runs", bucket_root=workdir / "buckets")
    ctx = Context(workdir=workdir, recipe=recipe, local=local, outputs={})
    console.rule(f"[bold]vicuna-sky demo[/] — {recipe.source}")
    results = []
    for stage in STAGES:
        start = time.monotonic()
        with console.status(f"{stage.name}..."):
            detail = stage.fn(ctx)
        took = time.monotonic() - start
        results.append((stage.name, "done", detail, took))
        console.print(f"[green]✓[/] {stage.name} ({took:.1f}s): {detail}")
    summary = Table(title="demo summary", title_justify="left")
    for col in ("stage", "status", "what", "seconds"):
        summary.add_column(col)
    for name, state, detail, took in results:
        summary.add_row(name, state, detail, f"{took:.1f}")
    console.print(summary)
    console.print(f"outputs under {workdir}")
    for key, value in ctx.outputs.items():
        console.print(f"  {key}: {value}")
