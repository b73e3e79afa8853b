"""Tokens a run trains on: the data's stats file, else the recipe's estimate, labelled."""

import json
import re
import shutil
from pathlib import Path

import pytest

from vicuna_sky.plan import PlanError, make_plan
from vicuna_sky.recipe import Recipe

from .conftest import BOTH, REAL_CATALOG, ROOT, replace


def plan_of(r):
    return make_plan(r, catalog_dir=REAL_CATALOG, enabled=BOTH)


def write_recipe(tmp_path, data: Path, extra: str = "") -> Path:
    text = (ROOT / "recipes" / "vicuna-7b.yaml").read_text()
    text = text.replace("path: data/sharegpt_clean_split.json", f"path: {data}")
    text = text.replace("  mfu: 0.4\n", f"  mfu: 0.4\n{extra}")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_tokens_from_the_data_stats_file(cli, tmp_path):
    data = tmp_path / "split.json"
    shutil.copy(ROOT / "tests" / "fixtures" / "fastchat" / "dummy_conversation.json", data)
    tokenizer = ROOT / "tests" / "fixtures" / "tokenizers" / "llama2"
    out = cli("data", "stats", str(data), "--tokenizer", str(tokenizer), "--write")
    assert out.returncode == 0, out.stderr
    stats = json.loads((tmp_path / "split.stats.json").read_text())
    assert stats["max_length"] == 2048 and 0 < stats["packs"] < stats["samples"] == 500
    unpacked = replace(Recipe.from_yaml(write_recipe(tmp_path, data)), "train", packing=False)
    plan = plan_of(unpacked)
    tc = plan.token_count
    assert (tc.per_epoch, tc.measured) == (stats["tokens"], True)
    assert plan.tokens == 3 * stats["tokens"]
    assert tc.sequences == stats["samples"]  # unpacked: one sample per sequence
    assert plan.best.checkpointing.steps_basis.startswith("500 sequences")
    packed = plan_of(replace(Recipe.from_yaml(write_recipe(tmp_path, data)), "train", packing=True))
    assert packed.token_count.sequences == stats["packs"]
    # The data changed after it was counted: back to the recipe's estimate, saying why.
    with data.open("a") as f:
        f.write(" ")
    stale = plan_of(Recipe.from_yaml(write_recipe(tmp_path, data)))
    assert not stale.token_count.measured and "older than" in stale.token_count.basis
    # A stats file named in the recipe must exist.
    missing = write_recipe(tmp_path, data, "  data_stats: nowhere.stats.json\n")
    with pytest.raises(PlanError, match=re.escape("data_stats nowhere.stats.json does not exist")):
        plan_of(Recipe.from_yaml(missing))


def test_pack_count_is_the_trainers_packing():
    import random

    from vicuna_sky.data.pipeline import pack_count
    from vicuna_sky.data.tokenize import IGNORE_INDEX, Tokenized, pack

    rng = random.Random(0)
    for max_length in (8, 64, 2048):
        lengths = [rng.choice([0, 1, 3, 7, 8, 40, 64, 100, 3000]) for _ in range(300)]
        samples = [Tokenized([1] * n, [IGNORE_INDEX] * n) for n in lengths]
        assert pack_count(lengths, max_length) == len(pack(samples, max_length))
