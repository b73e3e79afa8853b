"""Attention for packed rows, chosen per machine, and the loss: a packed row's logits and loss
equal those of its samples run one by one, under every attention implementation this machine
runs; the chunked loss equals the plain one, value and gradient."""

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from vicuna_sky.data.tokenize import IGNORE_INDEX
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.recipe import Recipe
from vicuna_sky.train import model as model_lib
from vicuna_sky.train.data import collate, load_dataset
from vicuna_sky.train.loss import next_token_loss_sum

ROOT = Path(__file__).resolve().parents[2]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def flash_attn_installed(tmp_path, monkeypatch):
    """An importable `flash_attn` package: the choice looks for it with find_spec, as
    transformers does, and never imports it."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("flash_attn", None)


def test_auto_choice_without_flash_attn():
    choose = model_lib.attention_implementation
    assert choose("auto", CUDA, packing=True) == "flex_attention"
    assert choose("auto", CUDA, packing=False) == "sdpa"
    assert choose("auto", CUDA, packing=True, dropout=0.1) == "sdpa"  # flex has no dropout
    assert choose("auto", CPU, packing=True) == "sdpa"  # flex has no backward on CPU
    assert choose("auto", CPU, packing=False) == "sdpa"
    assert choose("sdpa", CUDA, packing=True) == "sdpa"
    with pytest.raises(VicunaSkyError, match="needs a GPU and flash-attn installed"):
        choose("flash_attention_2", CUDA, packing=True)
    with pytest.raises(VicunaSkyError, match="trains on GPUs only"):
        choose("flex_attention", CPU, packing=True)
    with pytest.raises(VicunaSkyError, match="no attention dropout"):
        choose("flex_attention", CUDA, packing=True, dropout=0.25)


def test_flash_attn_is_used_when_a_user_brings_it(flash_attn_installed):
    choose = model_lib.attention_implementation
    assert choose("auto", CUDA, packing=True) == "flash_attention_2"
    assert choose("auto", CUDA, packing=False) == "flash_attention_2"
    assert choose("flash_attention_2", CUDA, packing=True) == "flash_attention_2"
    assert choose("auto", CPU, packing=True) == "sdpa"  # flash-attn kernels are CUDA only


def test_unknown_attention_is_refused(tmp_path):
    from vicuna_sky.train.config import TrainConfig

    data = tmp_path / "d.json"
    data.write_text("[]")
    with pytest.raises(VicunaSkyError, match="--attention 'flash'"):
        TrainConfig(model_path="m", data_path=str(data), attention="flash").check()


@pytest.fixture(scope="module")
def packed(tiny_model, tmp_path_factory):
    """Short conversations (about 120 tokens, the system prompt included) of varied lengths
    packed into 400-token rows, and unpacked."""
    from transformers import AutoTokenizer

    data = tmp_path_factory.mktemp("packed") / "short.json"
    data.write_text(json.dumps([
        {"id": f"s{i}", "conversations": [
            {"from": "human", "value": "Name a colour." + " Why?" * (i % 5)},
            {"from": "gpt", "value": f"Blue, number {i}." + " Because." * (i % 3)},
        ]}
        for i in range(24)
    ]))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = load_dataset(data, tokenizer, "vicuna_v1.1", 400, packing=True)
    single = load_dataset(data, tokenizer, "vicuna_v1.1", 400, packing=False)
    # Rows of several samples each (the test is empty otherwise).
    multi = [i for i, p in enumerate(rows.position_ids) if p.count(0) >= 2][:3]
    assert len(multi) == 3
    return rows, single, multi, tokenizer.pad_token_id or 0


def samples_of(position_ids: list[int]) -> list[slice]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


# Every implementation this machine runs for packed rows: SDPA with the dense block-causal mask
# everywhere; flex_attention with the document block mask in forward on CPU (torch 2.13 has no
# flex backward on CPU) and in both directions on a GPU.
IMPLEMENTATIONS = ["sdpa", "flex_attention"]
if torch.cuda.is_available():
    try:
        import flash_attn  # noqa: F401

        IMPLEMENTATIONS.append("flash_attention_2")
    except ImportError:
        pass


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_packed_logits_and_loss_equal_separate_samples(attention, packed, tiny_model):
    if attention == "flex_attention" and not model_lib.flex_available():
        pytest.skip("this torch has no flex_attention")
    from transformers import AutoModelForCausalLM

    rows, _, multi, pad_id = packed
    device = CUDA if torch.cuda.is_available() else CPU
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, attn_implementation=attention
    ).to(device)
    model.eval()
    # flex_attention gets rows padded to a fixed length, as the trainer gives them.
    pad_to = 512 if attention == "flex_attention" else 0
    batch = collate(rows, multi, pad_id, attention, pad_to)
    assert batch["input_ids"].shape[1] == (pad_to or max(rows.tokens[i] for i in multi))
    labels = batch.pop("labels").to(device)
    inputs = {k: v.to(device) for k, v in batch.items() if v is not None}
    if attention == "flex_attention":
        assert batch["attention_mask"] is None and batch["segments"].min() == -1  # padding
        inputs["attention_mask"] = model_lib.document_block_mask(inputs.pop("segments"))
    elif attention == "sdpa":
        assert batch["attention_mask"].shape == (3, 1, *batch["input_ids"].shape[1:2] * 2)
    with torch.no_grad():
        logits = model(**inputs).logits
        packed_loss = next_token_loss_sum(logits, labels)
        separate_loss = torch.zeros((), device=device)
        checked = 0
        for row, i in enumerate(multi):
            for part in samples_of(rows.position_ids[i]):
                ids = inputs["input_ids"][row : row + 1, part]
                alone = model(input_ids=ids).logits
                torch.testing.assert_close(logits[row : row + 1, part], alone, atol=2e-5, rtol=1e-4)
                separate_loss += next_token_loss_sum(alone, labels[row : row + 1, part])
                checked += 1
    assert checked >= 6
    torch.testing.assert_close(packed_loss, separate_loss, atol=1e-3, rtol=1e-5)


def test_packing_without_the_mask_would_differ(packed, tiny_model):
    """The comparison above can fail: the same rows without a sample mask (plain causal
    attention across samples) give other logits."""
    from transformers import AutoModelForCausalLM

    rows, _, multi, pad_id = packed
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    batch = collate(rows, multi, pad_id, "sdpa")
    with torch.no_grad():
        masked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits  # fmt: skip
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    second = samples_of(rows.position_ids[multi[0]])[1]
    assert not torch.allclose(masked[0, second], leaky[0, second], atol=1e-3)


def test_answer_and_token_counts_match_the_collated_batch(packed):
    rows, single, multi, pad_id = packed
    for dataset, idx in ((rows, multi), (single, [0, 1, 2, 3])):
        batch = collate(dataset, idx, pad_id, "sdpa")
        assert sum(dataset.answer_tokens[i] for i in idx) == int(
            (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        )
        assert sum(dataset.tokens[i] for i in idx) == sum(
            len(dataset.samples[i].input_ids) for i in idx
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_plain_loss(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 97, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 97, (3, 50))
    labels[:, :7] = IGNORE_INDEX
    labels[1, 30:] = IGNORE_INDEX
    chunked = next_token_loss_sum(logits, labels, chunk_tokens=16)  # 150 tokens: 10 chunks
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    reference_logits = logits.detach().float().requires_grad_()
    plain = F.cross_entropy(
        reference_logits[:, :-1].reshape(-1, 97),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    plain.backward()
    assert chunked.dtype == torch.float32 and chunked_grad.dtype == dtype
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-4)
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(chunked_grad.float(), reference_logits.grad, **tolerance)
    assert chunked_grad[:, -1].abs().sum() == 0  # the last position predicts nothing


@pytest.mark.parametrize("name", ["vicuna-7b", "vicuna-13b"])
def test_gpu_recipes_pack_by_default(name):
    recipe = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.train.packing is True
    assert recipe.envs()["PACKING"] == "true"


def test_packed_training_under_torchrun(run_trainer, trainer_args, tmp_path):
    """Packed rows through the trainer (SDPA with the block-causal mask on CPU), periodic
    checkpoints written in the background: each save's stall is in the metrics, both commit."""
    from checkpoints_sync import Checkpoints, open_store

    args = trainer_args(packing="true", max_steps=4, checkpoint_every_steps=2)
    run = run_trainer(tmp_path / "node", args)
    assert run.wait() == 0, run.output()[-3000:]
    assert "attention sdpa" in run.output()
    metrics = run.metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    stalls = {m["step"]: m.get("checkpoint_stall_seconds") for m in metrics}
    assert stalls[1] is None and stalls[3] is None
    assert 0 < stalls[2] < 30 and 0 < stalls[4] < 30
    assert all(m["tokens_per_second"] > 0 and m["loss"] > 0 for m in metrics)
    cps = Checkpoints(open_store(f"file://{tmp_path / 'bucket'}/ckpt"))
    assert cps.committed() == [2, 4]
    assert json.loads((run.cwd / "export" / "config.json").read_text())["num_hidden_layers"] == 2


def test_the_loss_keeps_no_fp32_copy_of_the_logits_for_backward():
    """Autograd saves only the bf16 logits' chunks (checkpointed); the plain loss saves an
    fp32 log-softmax of every logit."""
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64))

    def saved_fp32_elements(loss_fn) -> int:
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn().backward()
        return sum(t.numel() for t in saved if t.dtype == torch.float32)

    chunked = saved_fp32_elements(lambda: next_token_loss_sum(logits, labels, chunk_tokens=32))
    plain = saved_fp32_elements(
        lambda: F.cross_entropy(
            logits.float()[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1), reduction="sum"
        )
    )
    assert plain >= 127 * 1000  # the full fp32 log-softmax
    assert chunked < 32 * 1000  # at most one chunk's worth (only while it is recomputed)
