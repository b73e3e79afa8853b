"""The base model from the run's bucket after the first download (vicuna_sky.train.model_cache):
a relaunch on a fresh machine does not go to the hub again."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vicuna_sky.tiny import build_tiny_llama
from vicuna_sky.train import model_cache

REVISION = "a" * 40


def hub_cache_with(model: Path, cache: Path, repo: str) -> None:
    """`repo` in the hub's cache layout, as a download leaves it (the tests are offline, so
    huggingface_hub answers from here)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, root / "snapshots" / REVISION)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)


def run_cache(bucket: str, into: Path, hub_cache: Path, model: str = "acme/tiny"):
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vicuna_sky.train.model_cache", "--model-path", model,
         "--bucket", bucket, "--into", str(into)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_the_first_download_fills_the_bucket_and_a_relaunch_reads_it(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    hub_cache_with(model, tmp_path / "hub", "acme/tiny")
    bucket = tmp_path / "bucket"
    first = run_cache(str(bucket), tmp_path / "node1", tmp_path / "hub")
    assert first.returncode == 0, first.stderr
    assert "from the hub, then cached" in first.stderr
    cached = bucket / model_cache.cache_prefix("acme/tiny", "main")
    assert (cached / model_cache.COMPLETE).is_file()
    # A relaunch: a fresh machine whose hub cache is empty (and the hub unreachable).
    second = run_cache(str(bucket), tmp_path / "node2", tmp_path / "empty-hub")
    assert second.returncode == 0, second.stderr
    assert "from the bucket" in second.stderr
    local = Path(second.stdout.strip())
    assert local.is_relative_to(tmp_path / "node2")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert filecmp.cmp(local / name, model / name, shallow=False)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(local)  # a model the trainer can load


def test_a_copy_without_its_complete_marker_is_never_read(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    hub_cache_with(model, tmp_path / "hub", "acme/tiny")
    bucket = tmp_path / "bucket"
    assert run_cache(str(bucket), tmp_path / "node1", tmp_path / "hub").returncode == 0
    cached = bucket / model_cache.cache_prefix("acme/tiny", "main")
    (cached / model_cache.COMPLETE).unlink()  # preempted before the upload finished
    again = run_cache(str(bucket), tmp_path / "node2", tmp_path / "empty-hub")
    # Not from the half copy: the hub (unreachable here), so the trainer gets the id back.
    assert again.returncode == 0 and again.stdout.strip() == "acme/tiny"
    assert "model cache: not used" in again.stderr


@pytest.mark.parametrize("path", ["/abs/model", "./rel", "tiny-llama"])
def test_paths_and_names_that_are_not_hub_ids_pass_through(path, tmp_path):
    result = run_cache(str(tmp_path / "bucket"), tmp_path / "into", tmp_path / "hub", path)
    assert result.returncode == 0 and result.stdout.strip() == path
    assert not (tmp_path / "bucket").exists()


def test_an_upload_cut_short_leaves_no_complete_marker(tmp_path):
    """The copy is whole only once COMPLETE is there: an upload that fails on its last file
    (the bucket refuses it here) leaves none, so no later attempt reads a model with missing
    weights; the run gets the hub id back, as when there is no cache."""
    model = build_tiny_llama(tmp_path / "tiny")
    hub_cache_with(model, tmp_path / "hub", "acme/tiny")
    bucket = tmp_path / "bucket"
    cached = bucket / model_cache.cache_prefix("acme/tiny", "main")
    last = sorted(p.name for p in model.iterdir() if p.is_file())[-1]
    (cached / last).mkdir(parents=True)  # a folder where the last file must go: refused
    cut = run_cache(str(bucket), tmp_path / "node1", tmp_path / "hub")
    assert cut.returncode == 0 and cut.stdout.strip() == "acme/tiny", cut.stderr
    assert "model cache: not used" in cut.stderr
    assert not (cached / model_cache.COMPLETE).exists()
