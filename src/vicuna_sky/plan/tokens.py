"""How many tokens a run trains on, and where the figure came from: the data's stats file
(`vicuna-sky data stats --write`), or counted when the data and the tokenizer are on this
machine; the recipe's `data.tokens` only as a labelled estimate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vicuna_sky.plan.errors import PlanError
from vicuna_sky.recipe import Recipe


@dataclass(frozen=True)
class TokenCount:
    per_epoch: int
    sequences: int
    """Sequences per epoch as the trainer batches them (packs with packing); 0 = unknown."""
    measured: bool
    basis: str


def _measured(stats: object, packing: bool, where: str) -> TokenCount:
    """A count from the data's own stats (a stats file, or the data counted here)."""
    return TokenCount(
        stats.tokens,
        stats.packs if packing else stats.samples,
        True,
        f"measured: {stats.tokens:,} tokens in {stats.samples:,} samples {where}",
    )


def token_count(recipe: Recipe) -> TokenCount:
    """Tokens per epoch: the data's stats file, else counted when data and tokenizer are here,
    else the recipe's `data.tokens` as an estimate."""
    from vicuna_sky.data import pipeline
    from vicuna_sky.errors import VicunaSkyError

    packing, max_length = recipe.train.packing, recipe.data.max_length
    notes = []
    data = _local_data(recipe)
    explicit = recipe.plan.data_stats
    candidates = [_near_recipe(recipe, explicit)] if explicit else []
    if data and not explicit:
        candidates.append(pipeline.stats_path(data))
    for path in candidates:
        if not path.exists():
            if explicit:
                raise PlanError(f"{recipe.source}: plan.data_stats {explicit} does not exist")
            continue
        stats = pipeline.read_stats(path)
        if stats.max_length != max_length:
            notes.append(f"{path} counts at max length {stats.max_length}, not {max_length}")
            continue
        if data and stats.data_bytes and data.stat().st_size != stats.data_bytes:
            notes.append(f"{path} is older than {data} (its size changed)")
            continue
        where = f"({stats.tokenizer}, {stats.template}, max length {max_length}) from {path}"
        return _measured(stats, packing, where)
    if data and Path(recipe.model.path).is_dir():
        try:
            stats = pipeline.stats_file(data, recipe.model.path, recipe.model.template, max_length)
        except VicunaSkyError as e:
            notes.append(f"counting {data} failed: {e}")
        else:
            return _measured(stats, packing, f"counted in {data}")
    if recipe.data.tokens <= 0:
        raise PlanError(
            f"{recipe.source}: no token count: run `vicuna-sky data stats DATA --tokenizer "
            "MODEL --write` (or set plan.data_stats, or data.tokens as an estimate)"
        )
    why = "; ".join(notes) or "no stats file beside the data (`vicuna-sky data stats --write`)"
    return TokenCount(
        recipe.data.tokens,
        0,
        False,
        f"estimate: data.tokens of the recipe ({why})",
    )


def _near_recipe(recipe: Recipe, path: str) -> Path:
    """A path as written, else relative to the recipe's directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    near = Path(recipe.source).parent / p
    return near if near.exists() else p


def _local_data(recipe: Recipe) -> Path | None:
    """The training data on this machine: an absolute path, a file:// bucket's file, or the
    bucket-relative path under this directory or the recipe's (where `data split` wrote it)."""
    rel = Path(recipe.data.path)
    places = [rel] if rel.is_absolute() else []
    if recipe.bucket.startswith("file://") and not rel.is_absolute():
        places.append(Path(recipe.bucket.removeprefix("file://")) / rel)
    if not rel.is_absolute():
        places += [rel, Path(recipe.source).parent / rel]
    return next((p for p in places if p.is_file()), None)
