"""GGUF export, checked by reading every file back: with transformers' GGUF loader (logits,
tensors, tokenizer) and with the `gguf` package's reader (metadata, raw tensors) against the
SmolLM2 GGUF that llama.cpp's own converter wrote.

Tolerances, as the largest |logit difference| over the largest |logit| of the source model, on
the same prompt: f32 exact (torch.equal), f16 <= 2e-3, bf16 <= 2e-2, q8_0 <= 4e-2, and the
quantized files agree with the source on the next token at (nearly) every position.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.gguf.export import export_gguf
from vicuna_sky.gguf.load import gguf_to_safetensors, load_gguf
from vicuna_sky.models import smollm2_gguf

from ..gguf_common import PROMPT, logits, same_tokens, source_model

TOLERANCE = {"f32": 0.0, "f16": 2e-3, "bf16": 2e-2, "q8_0": 4e-2}


def _check_type(source_dir: Path, gguf_file: Path, out_type: str, ids=None) -> float:
    """Relative logit error of the GGUF against its source; asserts the type's tolerance."""
    source_tok = AutoTokenizer.from_pretrained(source_dir)
    ids = source_tok(PROMPT, return_tensors="pt").input_ids if ids is None else ids
    want = logits(source_model(source_dir), ids)
    model, tokenizer = load_gguf(gguf_file)
    got = logits(model, ids)
    if out_type == "f32":
        assert torch.equal(got, want)
    error = ((got - want).abs().max() / want.abs().max()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"\n{gguf_file.name}: relative logit error {error:.2e}, next token agrees {agree:.0%}")
    assert error <= TOLERANCE[out_type]
    assert agree >= 0.9
    same_tokens(source_tok, tokenizer)
    return error


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, tiny) -> Path:
    """Mistral-style: grouped-query attention (4 query heads share 2 KV heads), bf16 weights,
    sharded safetensors, tied embeddings and a 64-wide head that is not hidden / heads."""
    out = tmp_path_factory.mktemp("mistral") / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rope_theta=50000.0,
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="100KB")
    tokenizer.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_tiny_llama_every_type(tiny, tmp_path, out_type):
    done = export_gguf(tiny, tmp_path / f"tiny.{out_type}.gguf", out_type, progress=False)
    assert done["tokenizer"] == "gpt2 (gpt-2)" and done["tensors"] == 21
    _check_type(tiny, Path(done["path"]), out_type)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(done["path"]).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32, as llama.cpp's
    assert types["blk.0.ffn_down.weight"] == out_type.upper()


@pytest.mark.parametrize("out_type", ["f32", "q8_0"])
def test_mistral_gqa_sharded_bf16(mistral, tmp_path, out_type):
    done = export_gguf(mistral, tmp_path / "m.gguf", out_type, progress=False)
    _check_type(mistral, Path(done["path"]), out_type)
    reader = gguf.GGUFReader(done["path"])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer")}
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.attention.key_length"] == 64
    assert fields["llama.rope.freq_base"] == 50000.0
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: token_embd serves


def _q_and_k_are_permuted_per_head(model_dir: Path, gguf_file: Path) -> None:
    """Per head, rotate-half row i and row i + d/2 are stored as rows 2i and 2i + 1 (k over
    the 2 KV heads)."""
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(gguf_file).tensors}
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for proj, heads in (("q", 4), ("k", 2)):
        name = f"model.layers.1.self_attn.{proj}_proj.weight"
        with safe_open(model_dir / index[name], framework="pt") as f:
            hf = f.get_tensor(name).float().numpy()
        rows = hf.shape[0] // heads
        expected = np.empty_like(hf)
        for h in range(heads):
            head = hf[h * rows : (h + 1) * rows]
            expected[h * rows : (h + 1) * rows : 2] = head[: rows // 2]
            expected[h * rows + 1 : (h + 1) * rows : 2] = head[rows // 2 :]
        assert np.array_equal(stored[f"blk.1.attn_{proj}.weight"], expected), proj
        assert not np.array_equal(stored[f"blk.1.attn_{proj}.weight"], hf)


def test_q_and_k_are_stored_as_llama_cpp_rotates_them(mistral, tmp_path):
    """llama.cpp's RoPE rotates adjacent pairs (see `_q_and_k_are_permuted_per_head`)."""
    done = export_gguf(mistral, tmp_path / "m.gguf", "f32", progress=False)
    _q_and_k_are_permuted_per_head(mistral, Path(done["path"]))


def test_q_and_k_read_in_chunks_of_a_head_and_a_half(mistral, tmp_path, monkeypatch):
    """Issue #30 row 8: a chunk of rows must hold whole heads to be permuted on its own. A
    13B's hidden size (5120 columns) gives chunks that are not a whole number of heads; here
    a chunk of 1.5 heads' rows (96 of q's 4 x 64 and of k's 2 x 64, 128 columns each)."""
    import vicuna_sky.gguf.export as export

    monkeypatch.setattr(export, "CHUNK_ELEMENTS", 96 * 128)
    done = export_gguf(mistral, tmp_path / "m.gguf", "f32", progress=False)
    _q_and_k_are_permuted_per_head(mistral, Path(done["path"]))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> dict:
    """SmolLM2's GGUF (llama.cpp's converter wrote it) -> safetensors -> our f32 GGUF."""
    root = tmp_path_factory.mktemp("smollm2")
    source = gguf_to_safetensors(smollm2_gguf(), root / "model")
    reference = gguf.GGUFReader(smollm2_gguf())
    # The descriptive general.* keys llama.cpp took from SmolLM2's model card, which the
    # converted directory has no copy of, go in through llama.cpp's --metadata format.
    general = {
        key: field.contents()
        for key, field in reference.fields.items()
        if key.startswith("general.")
        and key not in ("general.architecture", "general.file_type", "general.quantization_version")
    }
    (root / "metadata.json").write_text(json.dumps(general))
    done = export_gguf(
        source, root / "smollm2.f32.gguf", "f32", metadata=root / "metadata.json", progress=False
    )
    return {"root": root, "source": source, "reference": reference, "ours": Path(done["path"])}


def test_smollm2_round_trip(smollm2):
    """Tensors equal after the round trip, read back both ways: transformers' loader gives the
    source model's tensors and logits exactly, and every raw tensor equals llama.cpp's own
    (dequantized from its Q4_1/Q8_0 blocks, same layout, q/k permutation included)."""
    ours = gguf.GGUFReader(smollm2["ours"])
    reference = {t.name: t for t in smollm2["reference"].tensors}
    assert {t.name for t in ours.tensors} == set(reference)
    for tensor in ours.tensors:
        ref = reference[tensor.name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == list(ref.shape)
        want = gguf.quants.dequantize(ref.data, ref.tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(tensor.data).reshape(-1), want), tensor.name

    source = source_model(smollm2["source"])
    loaded, tokenizer = load_gguf(smollm2["ours"])
    want, got = source.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    source_tok = AutoTokenizer.from_pretrained(smollm2["source"])
    ids = source_tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(logits(loaded, ids), logits(source, ids))
    same_tokens(source_tok, tokenizer)


def test_smollm2_metadata_matches_llama_cpp(smollm2):
    reference, ours = smollm2["reference"].fields, gguf.GGUFReader(smollm2["ours"]).fields
    assert set(ours) >= set(reference), sorted(set(reference) - set(ours))
    assert sorted(set(ours) - set(reference)) == ["tokenizer.ggml.add_eos_token"]
    differ = {
        key
        for key in reference
        if not key.startswith("GGUF.") and ours[key].contents() != reference[key].contents()
    }
    # file_type: ours is all f32, theirs Q4_1. Everything else as llama.cpp's converter wrote
    # it, the pre-tokenizer's name `smollm` included (the import keeps SmolLM2's digit split).
    assert differ == {"general.file_type"}
    assert ours["tokenizer.ggml.pre"].contents() == "smollm"
    assert ours["tokenizer.ggml.add_eos_token"].contents() is False


def test_smollm2_q8_0(smollm2):
    done = export_gguf(smollm2["source"], smollm2["root"] / "q8.gguf", "q8_0", progress=False)
    size = Path(done["path"]).stat().st_size
    assert size < smollm2["ours"].stat().st_size / 3.5
    _check_type(smollm2["source"], Path(done["path"]), "q8_0")


def test_refusals(tiny, tmp_path):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(VicunaSkyError, match=r"GPT2LMHeadModel is not supported; .*LlamaFor"):
        export_gguf(other, tmp_path / "x.gguf")
    with pytest.raises(VicunaSkyError, match="unknown GGUF type 'q4'"):
        export_gguf(tiny, tmp_path / "x.gguf", "q4")
    with pytest.raises(VicunaSkyError, match="is an input of this command"):
        export_gguf(tiny, tiny / "x.gguf")
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    config = json.loads((tiny / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    config.pop("rope_parameters", None)
    (scaled / "config.json").write_text(json.dumps(config))
    (scaled / "model.safetensors").symlink_to(tiny / "model.safetensors")
    with pytest.raises(VicunaSkyError, match="RoPE scaling 'yarn' is not supported"):
        export_gguf(scaled, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli(cli, tiny, tmp_path):
    ok = cli("export", "gguf", str(tiny), "-o", "out.gguf", "--type", "q8_0")
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"wrote out.gguf: q8_0, 21 tensors, 459,392 parameters", ok.stdout)
    assert gguf.GGUFReader(tmp_path / "out.gguf").fields["general.file_type"].contents() == 7
    before = (tmp_path / "out.gguf").read_bytes()
    for args in (
        ("-o", "out.gguf"),  # exists
        ("-o", str(tiny / "in.gguf")),  # inside the input
        ("-o", "y.gguf", "--type", "q4_0"),
        ("-o", "y.gguf", "--metadata", "missing.json"),
    ):
        bad = cli("export", "gguf", str(tiny), *args)
        assert bad.returncode == 2, (args, bad.stdout)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert (tmp_path / "out.gguf").read_bytes() == before
    missing = cli("export", "gguf", "nowhere", "-o", "y.gguf")
    assert missing.returncode == 2 and "model directory not found" in missing.stderr
    again = cli("export", "gguf", str(tiny), "-o", "out.gguf", "--type", "f32", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert gguf.GGUFReader(tmp_path / "out.gguf").fields["general.file_type"].contents() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    from vicuna_sky.gguf.export import export_gguf

    def mib(key):
        status = Path("/proc/self/status").read_text()
        return int(re.search(key + r":\\s+(\\d+)", status).group(1)) / 1024

    small, big, out_type = sys.argv[1], sys.argv[2], sys.argv[3]
    export_gguf(small, small + ".gguf", out_type, progress=False)  # warm-up: imports, arenas
    Path("/proc/self/clear_refs").write_text("5")  # restart the kernel's peak-RSS count
    baseline = mib("VmRSS")
    export_gguf(big, big + ".gguf", out_type, progress=False)
    print(json.dumps({"baseline": baseline, "peak": mib("VmHWM")}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("out_type", ["f32", "q8_0"])
def test_peak_memory_is_about_one_tensor(tiny, tmp_path, out_type):
    """Peak resident memory (VmHWM: anonymous and file-backed pages, counted exactly by the
    kernel) while exporting a ~110 MB float32 model whose largest tensor is 11 MiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny)

    def make(path: Path, **sizes) -> Path:
        config = LlamaConfig(vocab_size=len(tokenizer), num_attention_heads=8, **sizes)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path, max_shard_size="30MB")
        tokenizer.save_pretrained(path)
        return path

    big = make(tmp_path / "big", hidden_size=1024, intermediate_size=2816, num_hidden_layers=3)
    # Full-size chunks in the warm-up too, so one-time costs land in the baseline.
    small = make(tmp_path / "small", hidden_size=1024, intermediate_size=1024, num_hidden_layers=1)
    model_mib = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**20
    tensor_mib = 1024 * 2816 * 4 / 2**20
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(small), str(big), out_type],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    increase = result["peak"] - result["baseline"]
    print(
        f"\nexport {out_type} peak RSS increase {increase:.1f} MiB; model {model_mib:.1f} MiB, "
        f"largest tensor {tensor_mib:.1f} MiB"
    )
    assert increase < 2 * tensor_mib + 16
    assert increase < model_mib / 3
    _check_type(big, Path(str(big) + ".gguf"), out_type)


def test_demo_stage_exports_the_fine_tuned_model(tiny, tmp_path):
    """The demo's last stage (the full demo runs in tests/test_demo.py), on the tiny model."""
    from types import SimpleNamespace

    from vicuna_sky.demo import STAGES, stage_gguf

    assert STAGES[-1].fn is stage_gguf
    ctx = SimpleNamespace(
        workdir=tmp_path, recipe=SimpleNamespace(name="tiny-cpu"), outputs={"export": str(tiny)}
    )
    said = stage_gguf(ctx)
    out = tmp_path / "gguf" / "tiny-cpu.q8_0.gguf"
    assert ctx.outputs["gguf"] == str(out) and f"llama-cli -m {out}" in said
    fields = gguf.GGUFReader(out).fields
    assert fields["general.name"].contents() == "tiny-cpu (vicuna-sky)"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.parametrize(
    "target", [".", "model", "model/model.safetensors", "model/tokenizer.json", "meta.json"]
)
def test_no_input_is_ever_changed(cli, tiny, tmp_path, target):
    """The output set to an input (or the model directory), with and without --overwrite, through
    a symlink too: refused in one line, nothing changed (the rule of tests/test_outputs_never_
    inputs.py, for this command)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (tmp_path / "meta.json").write_text(json.dumps({"general.name": "x"}))
    (tmp_path / "alias").symlink_to(tmp_path / target)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, extra in ((target, ()), ("alias", ("--overwrite",))):
        args = ("export", "gguf", "model", "-o", out, "--metadata", "meta.json", *extra)
        result = cli(*args)
        assert result.returncode == 2, (out, extra, result.stdout)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
