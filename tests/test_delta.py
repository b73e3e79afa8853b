"""Delta weights: make -> apply gives back the fine-tuned model, in bounded memory."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from vicuna_sky.delta import MARKER, WIDE, apply_delta, make_delta
from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.tiny import build_tokenizer

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
VOCAB = 256


def _config(**overrides) -> LlamaConfig:
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    small |= dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**(small | overrides))


def _fine_tune(model: LlamaForCausalLM, seed: int = 1, shrink: int = 40) -> LlamaForCausalLM:
    """Trained-like new weights: noise on every weight, and 1% of the weights shrunk towards zero
    by 2^-10..2^-shrink (weights crossing zero, the case a float32 delta gets wrong for bf16)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            w = p.double()
            new = w + torch.randn(w.shape, generator=gen, dtype=WIDE) * 0.01
            tiny = torch.rand(w.shape, generator=gen, dtype=WIDE) < 0.01
            scale = 2.0 ** -torch.randint(10, shrink + 1, w.shape, generator=gen).to(WIDE)
            new = torch.where(tiny, w * scale * (0.5 + torch.rand(w.shape, generator=gen)), new)
            p.copy_(new.to(p.dtype))
    return model


def _add_noise(model: LlamaForCausalLM) -> LlamaForCausalLM:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _pair(root: Path, dtype: torch.dtype, shard="60KB", tune=None, **config) -> tuple[Path, Path]:
    """A random base (seed 0) and a fine-tuned-like target, saved in several shards."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config(**config)).to(dtype)
    base.save_pretrained(root / "base", max_shard_size=shard)
    # fp32 differences are exact in float64 down to a shrink of ~2^-28 (see delta.WIDE).
    tune = tune or (lambda m: _fine_tune(m, shrink=40 if dtype != torch.float32 else 25))
    tune(copy.deepcopy(base)).save_pretrained(root / "target", max_shard_size=shard)
    return root / "base", root / "target"


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out |= load_file(file)
    for file in sorted(model_dir.glob("*.bin")):
        out |= torch.load(file, weights_only=True)
    return out


def _as_bin(model_dir: Path) -> None:
    """Rewrite a directory's safetensors shards as two pytorch_model-*.bin shards + index."""
    tensors = _tensors(model_dir)
    for file in model_dir.glob("model*.safetensors*"):
        file.unlink()
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves, 1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in half}, model_dir / file)
        weight_map |= dict.fromkeys(half, file)
    index = {"metadata": {}, "weight_map": weight_map}
    (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _round_trip(tmp_path: Path, base: Path, target: Path, **kwargs) -> Path:
    delta = make_delta(base, target, tmp_path / "delta", progress=False, **kwargs)
    return apply_delta(base, delta, tmp_path / "out", max_shard_bytes=50_000, progress=False)


def _assert_same(out: Path, target: Path, exact: bool = True) -> None:
    got, want = _tensors(out), _tensors(target)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        if exact:
            assert torch.equal(got[name], tensor), name
        else:
            torch.testing.assert_close(got[name], tensor, rtol=1e-7, atol=1e-12)


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(torch.arange(1, 20)[None]).logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_reproduces_the_target(tmp_path, dtype):
    base, target = _pair(tmp_path, dtype)
    out = _round_trip(tmp_path, base, target)
    marker = json.loads((tmp_path / "delta" / MARKER).read_text())
    assert marker["delta_dtype"] == "float64"
    assert {e["dtype"] for e in marker["tensors"].values()} == {str(dtype)[6:]}
    assert marker["inexact_elements"] == 0
    assert all(t.dtype == WIDE for t in _tensors(tmp_path / "delta").values())
    assert len(list(out.glob("*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    _assert_same(out, target)
    assert torch.equal(_logits(out), _logits(target))


def test_bf16_weights_that_cross_zero_come_back_exactly(tmp_path):
    """Why the delta is float64: a bf16 weight that ends near zero (|t| < 2^-16 |b|) is not
    reproduced through a float32 delta (round(float32(t - b) + b) != t for these three), so
    make_delta and apply_delta must give them back bit for bit and count none as inexact."""
    base_values = torch.tensor([0.0234375, -1.5, 0.75], dtype=torch.bfloat16)
    target_values = torch.tensor([3.0e-9, 1.1e-7, -2.0e-6], dtype=torch.bfloat16)
    wide32 = (target_values.float() - base_values.float() + base_values.float()).bfloat16()
    assert not torch.equal(wide32, target_values)  # the case float32 gets wrong
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config()).to(torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        base.get_parameter(name).view(-1)[:3] = base_values
    base.save_pretrained(tmp_path / "base")
    target = copy.deepcopy(base)
    with torch.no_grad():
        target.get_parameter(name).view(-1)[:3] = target_values
    target.save_pretrained(tmp_path / "target")
    out = _round_trip(tmp_path, tmp_path / "base", tmp_path / "target")
    assert json.loads((tmp_path / "delta" / MARKER).read_text())["inexact_elements"] == 0
    assert torch.equal(_tensors(out)[name].view(-1)[:3], target_values)
    _assert_same(out, tmp_path / "target")


def test_single_output_shard_and_float32_weights_shrunk_too_far(tmp_path, capsys):
    """A 2^-40 shrink is beyond what float64 carries for fp32 (~2^-28): make counts those
    elements, and apply is still within float64 rounding."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    base.save_pretrained(tmp_path / "base")
    _fine_tune(copy.deepcopy(base), shrink=40).save_pretrained(tmp_path / "target")
    delta = make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", progress=False)
    assert json.loads((delta / MARKER).read_text())["inexact_elements"] > 0
    out = apply_delta(tmp_path / "base", delta, tmp_path / "out")
    err = capsys.readouterr().err
    assert "elements will not round-trip exactly" in err
    assert "apply delta" in err  # the progress bar, on stderr
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    _assert_same(out, tmp_path / "target", exact=False)


def test_tied_embeddings(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16, tie_word_embeddings=True)
    out = _round_trip(tmp_path, base, target)
    assert "lm_head.weight" not in _tensors(out)
    _assert_same(out, target)
    assert torch.equal(_logits(out), _logits(target))


def test_target_with_an_added_token(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(target)
    model.resize_token_embeddings(VOCAB + 1)
    model.save_pretrained(target := tmp_path / "grown", max_shard_size="60KB")
    out = _round_trip(tmp_path, base, target)
    marker = json.loads((tmp_path / "delta" / MARKER).read_text())
    grown = {n for n, e in marker["tensors"].items() if e.get("base_rows") == VOCAB}
    assert grown == {"model.embed_tokens.weight", "lm_head.weight"}
    _assert_same(out, target)
    assert _logits(out).shape[-1] == VOCAB + 1
    assert torch.equal(_logits(out), _logits(target))


def test_target_with_fewer_rows_is_refused(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(target)
    model.resize_token_embeddings(VOCAB - 6)
    model.save_pretrained(target := tmp_path / "shrunk")
    with pytest.raises(VicunaSkyError, match=r"(lm_head|embed_tokens).weight. has fewer rows"):
        make_delta(base, target, tmp_path / "delta", progress=False)
    assert not (tmp_path / "delta").exists()


def test_other_shape_mismatch_is_refused(tmp_path):
    base, _ = _pair(tmp_path, torch.bfloat16)
    torch.manual_seed(0)
    LlamaForCausalLM(_config(intermediate_size=96)).save_pretrained(tmp_path / "other")
    with pytest.raises(VicunaSkyError, match=r"shape mismatch for 'model.layers.0.mlp"):
        make_delta(base, tmp_path / "other", tmp_path / "delta", progress=False)


def test_bin_shards_for_base_target_and_delta(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    _as_bin(base)
    _as_bin(target)
    delta = make_delta(base, target, tmp_path / "delta", progress=False)
    _as_bin(delta)
    out = apply_delta(base, delta, tmp_path / "out", progress=False)
    assert not list(out.glob("*.bin"))
    _assert_same(out, target)


def test_config_and_tokenizer_are_carried(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    build_tokenizer(target)
    (target / "chat_template.jinja").write_text("{{ messages }}")
    out = _round_trip(tmp_path, base, target)
    carried = [p.name for p in target.iterdir() if not p.name.startswith("model")]
    assert "tokenizer.json" in carried
    for name in carried:
        assert (tmp_path / "delta" / name).read_bytes() == (target / name).read_bytes(), name
        assert (out / name).read_bytes() == (target / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids


def test_wrong_base_is_refused(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    delta = make_delta(base, target, tmp_path / "delta", progress=False)
    torch.manual_seed(1)  # same architecture, other weights
    LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(tmp_path / "other")
    with pytest.raises(VicunaSkyError, match="differs from the base this delta was made from"):
        apply_delta(tmp_path / "other", delta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.tmp-*"))


def test_missing_base_tensor(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16, shard="10MB")
    delta = make_delta(base, target, tmp_path / "delta", progress=False)
    tensors = _tensors(base)
    del tensors["model.norm.weight"]
    from safetensors.torch import save_file

    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VicunaSkyError, match=r"'model\.norm\.weight' is in the delta but not in"):
        apply_delta(base, delta, tmp_path / "out", progress=False)
    with pytest.raises(VicunaSkyError, match=r"'model\.norm\.weight' is in the target but not in"):
        make_delta(base, target, tmp_path / "delta2", progress=False)


def test_user_errors(tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    with pytest.raises(VicunaSkyError, match="is not a delta directory"):
        apply_delta(base, target, tmp_path / "out", progress=False)
    with pytest.raises(VicunaSkyError, match="delta directory not found"):
        apply_delta(base, tmp_path / "nope", tmp_path / "out", progress=False)
    with pytest.raises(VicunaSkyError, match="base directory not found"):
        make_delta(tmp_path / "nope", target, tmp_path / "d", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VicunaSkyError, match="no weights found in target directory"):
        make_delta(base, tmp_path / "empty", tmp_path / "d", progress=False)
    delta = make_delta(base, target, tmp_path / "delta", progress=False)
    with pytest.raises(VicunaSkyError, match="is a delta, not a model"):
        make_delta(delta, target, tmp_path / "d", progress=False)
    with pytest.raises(VicunaSkyError, match="already exists and is not empty"):
        apply_delta(base, delta, target, progress=False)
    (tmp_path / "out").mkdir()  # an existing empty directory is fine
    assert apply_delta(base, delta, tmp_path / "out", progress=False) == tmp_path / "out"
    # JSON of the wrong shape is an error, not a traceback.
    marker = delta / "delta_config.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"tensors": []}))
    with pytest.raises(VicunaSkyError, match="not the JSON object expected"):
        apply_delta(base, delta, tmp_path / "out2", progress=False)
    (base / "config.json").write_text("[]")
    with pytest.raises(VicunaSkyError, match="not the JSON object expected"):
        make_delta(base, target, tmp_path / "d2", progress=False)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    from vicuna_sky.delta import apply_delta

    def mib(key):
        status = Path("/proc/self/status").read_text()
        return int(re.search(key + r":\\s+(\\d+)", status).group(1)) / 1024

    small, big = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    apply_delta(**small, progress=False)  # warm-up: lazy imports and first-use allocations
    Path("/proc/self/clear_refs").write_text("5")  # restart the kernel's peak-RSS count
    baseline = mib("VmRSS")
    apply_delta(**big, progress=False)
    print(json.dumps({"baseline": baseline, "peak": mib("VmHWM")}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_apply_peak_memory_is_about_one_shard(tmp_path):
    """Peak resident memory (VmHWM: anonymous and file-backed pages, as the kernel counts them
    exactly, no sampling) while applying a ~100 MB model with 16 MB shards."""
    shard = 16 * 10**6
    big = dict(hidden_size=1024, intermediate_size=2816, vocab_size=1024, num_attention_heads=8)
    base, target = _pair(tmp_path / "big", torch.float32, "16MB", _add_noise, **big)
    big_delta = tmp_path / "big" / "delta"
    delta = make_delta(base, target, big_delta, max_shard_bytes=2 * shard, progress=False)
    # The warm-up model has full-size chunks too, so one-time costs (kernels' code pages, the
    # allocator's first arenas, worker threads) land in the baseline, not in the figure.
    warm = dict(hidden_size=512, intermediate_size=1024, vocab_size=512, num_hidden_layers=1)
    small_base, small_target = _pair(tmp_path / "small", torch.float32, tune=_add_noise, **warm)
    small_delta = make_delta(small_base, small_target, tmp_path / "small" / "delta", progress=False)
    model_mib = sum(f.stat().st_size for f in target.glob("*.safetensors")) / 2**20
    args = [
        json.dumps({"base": str(b), "delta": str(d), "out": str(o), "max_shard_bytes": shard})
        for b, d, o in ((small_base, small_delta, tmp_path / "o1"), (base, delta, tmp_path / "o2"))
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *args], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    increase = result["peak"] - result["baseline"]
    shard_mib = shard / 2**20
    print(
        f"\napply_delta peak RSS increase {increase:.1f} MiB; model {model_mib:.1f} MiB, "
        f"{len(list((tmp_path / 'o2').glob('*.safetensors')))} shards of <= {shard_mib:.1f} MiB"
    )
    assert len(list((tmp_path / "o2").glob("*.safetensors"))) >= 6
    assert increase < 2 * shard_mib + 8
    assert increase < model_mib / 3
    _assert_same(tmp_path / "o2", target)


def test_cli_make_and_apply(cli, tmp_path):
    base, target = _pair(tmp_path, torch.bfloat16)
    made = cli("delta", "make", "--base", str(base), "--target", str(target), "--out", "d")
    assert made.returncode == 0, made.stderr
    applied = cli("delta", "apply", "--base", str(base), "--delta", "d", "--out", "t")
    assert applied.returncode == 0, applied.stderr
    _assert_same(tmp_path / "t", target)
    again = cli("delta", "apply", "--base", str(base), "--delta", str(base), "--out", "t2")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
