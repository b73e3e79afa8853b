"""A trained Llama-family model as one GGUF file, the format llama.cpp runs.

What goes in, and in what form, follows llama.cpp's own converter (`convert_hf_to_gguf.py`), so a
file from here loads wherever one from there does:

- Architecture: `llama` metadata (block count, widths, heads and KV heads, RoPE base, RMS-norm
  epsilon, context length, vocab size) from the model's config. Llama, Llama-2, SmolLM2 and
  Mistral-style grouped-query attention all map to it; anything else is refused before any
  tensor is read.
- Tensors: renamed with the `gguf` package's tensor-name map, one at a time and in row chunks,
  so memory stays at about one output tensor whatever the model. The q and k projections are
  permuted per head: transformers keeps each head's rotary halves apart (rotate-half), llama.cpp's
  RoPE kernel rotates adjacent pairs, so within every head row `i` of the first half and row `i`
  of the second half become rows `2i` and `2i + 1` (k with the KV-head count). transformers'
  GGUF loader reverses exactly this. Norms and other 1-D tensors stay float32, as llama.cpp
  keeps them; the chosen type applies to matrices (q8_0 falls back to f16 for a matrix whose
  rows are not whole 32-element blocks, as llama.cpp does).
- Tokenizer (`gguf.tokenizer`): byte-level BPE (`gpt2`: tokens, merges, token types) or
  SentencePiece-style BPE (`llama`: tokens, scores, token types), special token ids, whether
  BOS/EOS are added (as the source tokenizer actually does it) and the chat template. A
  byte-level tokenizer's pre-tokenizer name is one of llama.cpp's, chosen by what the tokenizer
  does (`gguf.vocab`): a tokenizer that splits text as none of them do is refused, never
  written under a wrong name.
  `add_bos_token` and `add_eos_token` are both written, false too (llama.cpp's converter omits
  a false EOS flag): llama.cpp reads them and otherwise falls back on a per-vocabulary-type
  default (`llama-bpe` and SentencePiece add BOS), so the file says what the source does.
- `general.file_type` is the type the matrices are in (llama.cpp reads it; without it, it
  guesses from the tensors). The descriptive `general.*` keys (name, license, organization...)
  are shown by llama.cpp but change nothing it computes; they come from the `gguf` package's
  own heuristics (directory name, the model card's front matter) and an optional override file
  in llama.cpp's `--metadata` JSON format.

The file is written to a temporary beside the output and renamed only when complete (see
`vicuna_sky.output`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.gguf.tokenizer import add_tokenizer
from vicuna_sky.inputs import read_json_object
from vicuna_sky.output import check_output_file, writing

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
"""What the export understands (class name -> model_type); both are llama.cpp's `llama`."""
SUPPORTED = "Llama-family models (LlamaForCausalLM, MistralForCausalLM)"
TYPES = ("f32", "f16", "bf16", "q8_0")
CHUNK_ELEMENTS = 1 << 20
"""Rows are read and converted in chunks of about this many elements (4 MB in float32)."""
_ROPE_TYPES = ("default", "linear")


@dataclass
class _Tensor:
    source: str
    """Its name in the safetensors files."""
    name: str
    """Its name in the GGUF file."""
    shard: Path
    shape: tuple[int, ...]
    qtype: Any
    """gguf.GGMLQuantizationType it is written in."""
    heads: int = 0
    """Heads to permute the rows over (q and k projections), 0 for none."""


def _check_architecture(config: dict[str, Any], model_dir: Path) -> None:
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    if not (set(archs) & ARCHITECTURES.keys()) or config.get("model_type") not in (
        ARCHITECTURES.values()
    ):
        what = ", ".join(map(str, archs))
        raise VicunaSkyError(
            f"{model_dir}: {what} is not supported; GGUF export supports {SUPPORTED}"
        )


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise VicunaSkyError(f"{index}: no weight_map")
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise VicunaSkyError(
        f"no safetensors weights in {model_dir} (model.safetensors or "
        "model.safetensors.index.json); save the model with safe_serialization=True"
    )


def _tensor_headers(shards: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Every tensor's shard, shape and dtype, from the headers alone."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    lazy = f.get_slice(name)
                    found[name] = (shard, tuple(lazy.get_shape()), lazy.get_dtype())
        except Exception as e:  # missing, truncated or foreign file: one line, no traceback
            raise VicunaSkyError(f"cannot read weights from {shard}: {e}") from None
    return found


def _matrix_type(out_type: str, shape: tuple[int, ...]) -> Any:
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or out_type == "f32":
        return Q.F32
    if out_type == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[out_type]


def _plan(config: Any, headers: dict, out_type: str) -> list[_Tensor]:
    import gguf

    blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    plan = []
    for source, (shard, shape, dtype) in headers.items():
        if source.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the RoPE base by every runtime
        if source == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for the output when there is no output tensor
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise VicunaSkyError(f"tensor {source!r} has no place in a llama GGUF file")
        if dtype not in ("F32", "F16", "BF16"):
            raise VicunaSkyError(f"tensor {source!r} is {dtype}: only float weights are supported")
        permute = heads if ".attn_q." in name else kv_heads if ".attn_k." in name else 0
        if permute and shape[0] % (2 * permute):
            raise VicunaSkyError(f"tensor {source!r}: {shape[0]} rows do not split into heads")
        plan.append(_Tensor(source, name, shard, shape, _matrix_type(out_type, shape), permute))
    if not any(t.name == "token_embd.weight" for t in plan):
        raise VicunaSkyError("the model has no token embedding (model.embed_tokens.weight)")
    return plan


def _nbytes(tensor: _Tensor) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[tensor.qtype]
    return math.prod(tensor.shape) // block * size


def _permute_heads(rows: Any, heads: int) -> Any:
    """One or more whole heads of a q/k projection, rotate-half layout -> adjacent pairs."""
    n, cols = rows.shape[0], rows.shape[1:]
    return rows.reshape(heads, 2, n // heads // 2, *cols).transpose(1, 2).reshape(rows.shape)


def _row_chunks(tensor: _Tensor) -> Iterator[tuple[int, int]]:
    rows = tensor.shape[0] if tensor.shape else 1
    cols = math.prod(tensor.shape[1:]) if len(tensor.shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // cols)
    if tensor.heads:  # whole heads only, so each chunk can be permuted on its own
        per_head = rows // tensor.heads
        step = max(1, step // per_head) * per_head
    for lo in range(0, rows, step):
        yield lo, min(lo + step, rows)


def _converted(tensor: _Tensor) -> np.ndarray:
    """The tensor in its GGUF type, built chunk by chunk in its output buffer. Each chunk opens
    the shard anew: safe_open maps the file and the pages a read touches stay resident until it
    is closed, which would otherwise hold the whole source tensor in memory as well."""
    import gguf
    import torch
    from safetensors import safe_open

    Q = gguf.GGMLQuantizationType
    out = np.empty(_nbytes(tensor), dtype=np.uint8)
    written = 0
    for lo, hi in _row_chunks(tensor):
        with safe_open(tensor.shard, framework="pt") as f:
            lazy = f.get_slice(tensor.source)
            chunk = lazy[...] if not tensor.shape else lazy[lo:hi]
        chunk = chunk.to(torch.float32)  # exact from f16 and bf16
        if tensor.heads:
            chunk = _permute_heads(chunk, tensor.heads * (hi - lo) // tensor.shape[0])
        data = chunk.numpy()
        if tensor.qtype == Q.F32:
            raw = data
        elif tensor.qtype == Q.F16:
            raw = data.astype(np.float16)
        else:  # BF16 (round to nearest even) and Q8_0 (per 32-element block scale), as llama.cpp
            raw = gguf.quants.quantize(data, tensor.qtype)
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        out[written : written + raw.size] = raw
        written += raw.size
    if written != out.size:
        raise VicunaSkyError(f"tensor {tensor.source!r}: wrote {written} of {out.size} bytes")
    return out


# --- the file --------------------------------------------------------------------------------


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise VicunaSkyError(
            f"RoPE scaling {kind!r} is not supported by GGUF export (supported: default, linear)"
        )
    return float(theta if theta is not None else 10000.0), params if kind == "linear" else {}


def _add_architecture(writer: Any, config: Any, out_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, linear = _rope(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if linear:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(linear["factor"]))
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_general(writer: Any, model_dir: Path, metadata: Path | None, params: int) -> None:
    import gguf

    override = read_json_object(Path(metadata)) if metadata is not None else {}
    info = gguf.Metadata.load(metadata, model_dir, None, params)
    # gguf's loader skips a few keys of its own override format (general.license among them):
    # every general.* key the file gives that names a Metadata field wins, as llama.cpp documents.
    for key, value in override.items():
        field = key.removeprefix("general.")
        if key.startswith("general.") and field in gguf.Metadata.__dataclass_fields__:
            setattr(info, field, value)
    if info.size_label is None:
        info.size_label = gguf.size_label(params, 0, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    info.set_gguf_meta_model(writer)


def export_gguf(
    model_dir: Path,
    out: Path,
    out_type: str = "f32",
    *,
    metadata: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `model_dir` (a transformers Llama-family model in safetensors) to the GGUF file
    `out` with matrices in `out_type`. Returns a summary: path, bytes, tensors, tokenizer."""
    import gguf
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    model_dir, out = Path(model_dir), Path(out)
    if out_type not in TYPES:
        raise VicunaSkyError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(TYPES)}")
    if not model_dir.is_dir():
        raise VicunaSkyError(f"model directory not found: {model_dir}")
    if metadata is not None and not Path(metadata).is_file():
        raise VicunaSkyError(f"metadata file not found: {metadata}")
    check_output_file(out, [model_dir, metadata], overwrite=overwrite)
    _check_architecture(read_json_object(model_dir / "config.json"), model_dir)
    # transformers takes seconds to import: every refusal above comes before it.
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise VicunaSkyError(f"cannot read {model_dir / 'config.json'}: {e}") from None
    headers = _tensor_headers(_shards(model_dir))
    plan = _plan(config, headers, out_type)
    params = sum(math.prod(t.shape) for t in plan)

    with writing(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _add_general(writer, model_dir, metadata, params)
            _add_architecture(writer, config, out_type)
            summary = add_tokenizer(writer, model_dir, config.vocab_size)
            for t in plan:
                # The shape as numpy orders it; the writer stores it reversed, as ggml does.
                writer.add_tensor_info(t.name, t.shape, np.float32, _nbytes(t), raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            columns = (TextColumn("export gguf"), BarColumn(), MofNCompleteColumn())
            bar = Progress(
                *columns, TimeElapsedColumn(), console=Console(stderr=True), disable=not progress
            )
            with bar:
                task = bar.add_task("tensors", total=len(plan))
                for t in plan:
                    writer.write_tensor_data(_converted(t))
                    bar.advance(task)
        finally:
            writer.close()
    return {
        "path": str(out),
        "type": out_type,
        "bytes": out.stat().st_size,
        "tensors": len(plan),
        "parameters": params,
        **summary,
    }
