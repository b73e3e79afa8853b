"""`vicuna-sky demo`: the pipeline on the tiny CPU recipe, on this machine.

Stages run in order and each says what it produced. A stage whose component has not been
built yet is listed as such rather than faked; the summary shows what ran and where.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.local import LocalConfig
from vicuna_sky.launch.tasks import Spec, load_task, resolve_recipe
from vicuna_sky.recipe import Recipe

console = Console()
RECIPE = "tiny-cpu"


@dataclass
class Context:
    workdir: Path
    recipe: Recipe
    local: LocalConfig
    outputs: dict[str, str]

    @property
    def bucket_dir(self) -> Path:
        scheme, _, rest = self.recipe.bucket.partition("://")
        return Path(self.local.bucket_root or self.workdir / "buckets") / scheme / rest


@dataclass
class Stage:
    name: str
    fn: Callable[[Context], str]
    needs: str = ""
    """Module the stage runs; until it exists the stage is reported as not built yet."""


def stage_assets(ctx: Context) -> str:
    from vicuna_sky.tiny import build_tiny_llama, demo_conversations

    model_dir = build_tiny_llama(ctx.workdir / "tiny-llama")
    raw = ctx.workdir / "raw" / "sharegpt_html.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(demo_conversations(), indent=1, ensure_ascii=False))
    ctx.outputs["model"] = str(model_dir)
    ctx.outputs["raw data"] = str(raw)
    return f"tiny Llama + tokenizer in {model_dir}; ShareGPT HTML sample in {raw}"


def stage_data(ctx: Context) -> str:
    """Clean the HTML sample, split it to the recipe's context, upload it where training reads."""
    from vicuna_sky.data.clean import CleanConfig
    from vicuna_sky.data.pipeline import clean_file, split_file, stats_file
    from vicuna_sky.data.split import SplitConfig

    raw = Path(ctx.outputs["raw data"])
    cleaned = raw.with_name("sharegpt_clean.json")
    kept = clean_file(raw, cleaned, CleanConfig(workers=1), quiet=True)
    target = ctx.bucket_dir / ctx.recipe.data.path
    tokenizer, template = ctx.outputs["model"], ctx.recipe.model.template
    config = SplitConfig(tokenizer, ctx.recipe.data.max_length, template, workers=1)
    split = split_file(cleaned, target, config, quiet=True)
    stats = stats_file(target, tokenizer, template, ctx.recipe.data.max_length)
    ctx.outputs["data"] = str(target)
    removed = ", ".join(f"{n} {rule}" for rule, n in kept.counts.items() if rule != "kept" and n)
    return (
        f"{len(kept.samples)} of {len(raw_samples(raw))} conversations kept ({removed}); "
        f"{len(split.samples)} segments of <= {ctx.recipe.data.max_length} tokens; "
        f"{stats.tokens} tokens, {stats.trainable_tokens} trained on; uploaded to the bucket"
    )


def raw_samples(path: Path) -> list:
    return json.loads(path.read_text())


def stage_specs(ctx: Context) -> str:
    checked = []
    for spec in Spec:
        extra = {"CONTROLLER_URL": "http://127.0.0.1:8000"} if spec is Spec.WORKER else {}
        load_task(spec, ctx.recipe, extra)
        checked.append(spec.value)
    return f"{len(checked)} specs resolved and validated by SkyPilot: {', '.join(checked)}"


STAGES = [
    Stage("prepare", stage_assets),
    Stage("validate specs", stage_specs),
    Stage("clean + split data", stage_data),
    Stage("train (with a preemption)", lambda ctx: "", needs="vicuna_sky.train"),
    Stage("serve", lambda ctx: "", needs="vicuna_sky.serve.controller"),
    Stage("evaluate", lambda ctx: "", needs="vicuna_sky.eval.judge"),
]


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package does not exist yet
        return False


def run(workdir: Path) -> None:
    # Nothing in the demo leaves this machine, SkyPilot's usage reporting included.
    os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / ".vicuna-demo").exists():
        raise VicunaSkyError(f"{workdir} is not empty and not a demo directory; pick another")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / ".vicuna-demo").touch()
    recipe = Recipe.from_yaml(resolve_recipe(RECIPE))
    local = LocalConfig(runs_dir=workdir / "runs", bucket_root=workdir / "buckets")
    ctx = Context(workdir=workdir, recipe=recipe, local=local, outputs={})
    console.rule(f"[bold]vicuna-sky demo[/] — {recipe.source}")
    results = []
    for stage in STAGES:
        if stage.needs and not _available(stage.needs):
            results.append((stage.name, "not built yet", f"needs {stage.needs}", 0.0))
            console.print(f"[dim]- {stage.name}: not built yet[/]")
            continue
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
