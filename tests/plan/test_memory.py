"""The memory model, by hand, and the preflight that uses it."""

import pytest

from vicuna_sky.launch import preflight
from vicuna_sky.plan import memory

from .conftest import recipe, replace


def test_13b_full_fine_tuning_on_8_l4_does_not_fit():
    r = replace(recipe("vicuna-13b"), "resources", accelerator="L4")
    fit = memory.fit(r, "l4")  # any case
    # 13e9 x 16 bytes / 8 GPUs = 26 GB of state per GPU, more than 0.85 x 24 GB before any
    # activation.
    assert fit.gpu == "L4" and fit.states_gb == pytest.approx(26.0)
    # Gathered layers: 2 layers x 2 bytes x 13e9 / 40 layers; activations at micro batch 1 x
    # 2048 tokens, hidden 5120, with checkpointing: 40 x 2 x 2048 x 5120 + 34 x 2048 x 5120,
    # + fp32 logits and their gradient 8 x 2048 x 32,000.
    assert fit.gathered_gb == pytest.approx(1.3)
    tokens = 1 * 2048
    acts = 40 * 2 * tokens * 5120 + 34 * tokens * 5120 + 8 * tokens * 32_000
    assert fit.activations_gb == pytest.approx(acts / 1e9)
    assert fit.usable_gb == pytest.approx(20.4) and not fit.fits
    assert "does not fit" in fit.line()
    # The same model fits 8 x H100, and with LoRA (2 bytes/param) even 8 x L4.
    assert memory.fit(r, "H100").fits
    lora = replace(r, "train", lora_r=16)
    assert memory.fit(lora, "L4").states_gb == pytest.approx(13e9 * 2 / 8 / 1e9)
    assert memory.fit(lora, "L4").fits
    assert memory.fit(r, "TPU-v9") is None  # unknown memory: not judged
    assert set(fit.to_dict()) == set(memory.EMPTY)  # the JSON's keys, figures or not


def test_preflight_uses_the_planners_memory_model():
    r = replace(recipe("vicuna-13b"), "resources", accelerator="L4")
    finding = preflight.check_memory(r)
    need = memory.fit(r, "L4").need_gb
    assert not finding.ok
    assert finding.line.startswith(f"13B parameters need about {need:,.1f} GB per GPU on 8 x L4")
    assert "LoRA (train.lora_r)" in finding.line
    assert preflight.check_memory(recipe("vicuna-13b")).ok


def test_more_nodes_shard_the_state_further():
    """FSDP shards the states across every GPU of every node: 13B on 2 nodes of 8 L4 holds
    half the state per GPU of one node, and the preflight judges the recipe's own nodes."""
    one = replace(recipe("vicuna-13b"), "resources", accelerator="L4")
    two = replace(one, "resources", nodes=2)
    assert memory.fit(two, "L4").gpus == 16
    assert memory.fit(two, "L4").states_gb == pytest.approx(memory.fit(one, "L4").states_gb / 2)
    assert memory.fit(two, "L4").states_gb == pytest.approx(13.0)
    assert memory.fit(two, "L4", gpus=8).states_gb == pytest.approx(26.0)  # asked: 8 GPUs
    four = replace(one, "resources", nodes=4)
    assert not preflight.check_memory(one).ok and preflight.check_memory(four).ok
