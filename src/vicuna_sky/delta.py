"""Delta weights: publish a fine-tuned model as `target - base`, rebuild it as `base + delta`.

Vicuna shipped its weights this way over LLaMA, whose licence did not allow sharing LLaMA's own
weights. Both directions stream: tensors are read one at a time, in row chunks, through
`safetensors.safe_open` or a memory-mapped `torch.load` of `.bin` shards, and each chunk of the
result goes straight into its output shard, so memory stays at a few chunks whatever the model
(for `.bin` input, plus the pages of the current tensor, which its memory map keeps resident).

A delta directory holds the target's config and tokenizer files, safetensors shards of the delta
in float64 (`WIDE`) and `delta_config.json` (`MARKER`): format and version, the base's identity
(config fields, and a fingerprint of every base tensor so that a wrong base is refused) and per
tensor the target's dtype and, for grown tensors, the base's row count.

Vocabulary rule: a tensor whose first dimension is the base's vocab size (embeddings, output
head) may have more rows in the target (added tokens, e.g. a pad token). The delta holds
target - base for the rows both have and the target's own values for the extra rows; apply
reverses that. Fewer rows, or any other shape change, is an error naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.inputs import read_json_object
from vicuna_sky.output import check_output_dir, writing_dir

FORMAT = "vicuna-sky-delta"
VERSION = 1
MARKER = "delta_config.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
# Why float64. apply computes round(base + delta) in the target's dtype, which gives back the
# target exactly whenever target - base is exact in the wide type. fp16 values are multiples of
# 2^-24 below 2^16, so their differences always fit float64's 53-bit significand. For bf16 (fp32)
# the difference is exact unless a weight ends below ~2^-44 (~2^-28) of its base value. float32
# is not enough: a bf16 weight that ends below 2^-16 of its base (one crossing zero during
# fine-tuning) comes back wrong, and a 7B model has thousands. make_delta checks every element
# anyway and records any that would not come back. Caveat: a -0.0 weight comes back as +0.0.
WIDE = torch.float64
SIDE_FILES = (
    *("config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"),
    *("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
    *("vocab.json", "merges.txt"),
)
CHUNK_ELEMENTS = 1 << 18
"""Rows are combined in chunks of about this many elements (2 MB per float64 temporary)."""
_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_DTYPES = {code: name for name, code in _CODES.items()}

Meta = tuple[tuple[int, ...], str]
"""A tensor's shape and dtype name, known from the shard headers before any data is read."""
Entry = dict[str, Any]
"""A tensor's record in the marker: dtype, base fingerprint, base_rows if it grew."""
Entries = dict[str, Entry]
Rows = Callable[[int, int], torch.Tensor]


def _require_dir(path: Path, role: str) -> None:
    if not path.is_dir():
        raise VicunaSkyError(f"{role} directory not found: {path}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # mmap: the tensors are views of the file, pages are read only when a chunk is used.
    return torch.load(path, mmap=True, weights_only=True, map_location="cpu")


def _shard_files(root: Path, role: str) -> list[Path]:
    for index, single in _LAYOUTS:
        if (root / index).is_file():
            weight_map = read_json_object(root / index, "weight_map").get("weight_map", {})
            return [root / name for name in sorted(set(weight_map.values()))]
        if (root / single).is_file():
            return [root / single]
    names = ", ".join(name for layout in _LAYOUTS for name in layout)
    raise VicunaSkyError(f"no weights found in {role} directory {root} (looked for {names})")


def _shard_meta(path: Path) -> dict[str, Meta]:
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                lazy = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
                return {n: (tuple(s.get_shape()), s.get_dtype()) for n, s in lazy.items()}
        state = _load_bin(path)
        return {n: (tuple(t.shape), _CODES.get(str(t.dtype)[6:], "?")) for n, t in state.items()}
    except Exception as exc:  # missing, truncated or foreign file: one clear line, no traceback
        raise VicunaSkyError(f"cannot read weights from {path}: {exc}") from exc


class _Source:
    """The weights of one model directory: every tensor's shape and dtype up front, from the
    shard headers; tensor data on demand, one tensor at a time."""

    def __init__(self, root: Path, role: str) -> None:
        _require_dir(root, role)
        if role != "delta" and (root / MARKER).is_file():
            raise VicunaSkyError(f"{role} directory {root} is a delta, not a model")
        self.where: dict[str, Path] = {}
        self.meta: dict[str, Meta] = {}
        for path in _shard_files(root, role):
            for name, (shape, code) in _shard_meta(path).items():
                if code not in _DTYPES:
                    raise VicunaSkyError(
                        f"{role} tensor {name!r}: only float weights are supported"
                    )
                self.where[name], self.meta[name] = path, (shape, _DTYPES[code])
        if not self.meta:
            raise VicunaSkyError(f"no tensors found in {role} directory {root}")

    @contextmanager
    def reader(self, name: str) -> Iterator[Rows]:
        """Yield a reader of rows [lo, hi) of `name`. safe_open maps the file and the pages a read
        touches stay resident until it is closed, so every chunk opens the shard anew (a header
        parse, ~0.1 ms). A .bin shard is loaded, memory-mapped, once for the whole tensor."""
        path, scalar = self.where[name], not self.meta[name][0]
        if path.suffix == ".safetensors":

            def read(lo: int, hi: int) -> torch.Tensor:
                with safe_open(path, framework="pt") as f:
                    lazy = f.get_slice(name)
                    return lazy[...] if scalar else lazy[lo:hi]

            yield read
        else:
            tensor = _load_bin(path)[name]
            yield lambda lo, hi: tensor if scalar else tensor[lo:hi]


def _chunks(shape: tuple[int, ...], split: int | None) -> Iterator[tuple[int, int, int]]:
    """(lo, hi, cols): the tensor as rows x cols (a scalar is one row of one), in ranges of about
    CHUNK_ELEMENTS elements that never straddle `split`, the first row the base does not have."""
    rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    split = rows if split is None else split
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start, stop in ((0, split), (split, rows)):
        for lo in range(start, stop, step):
            yield lo, min(lo + step, stop), cols


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _combine(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one formula apply uses and make checks against: round(base + delta) to `dtype`."""
    return (base.to(WIDE) + delta.to(WIDE)).to(dtype)


def _subtract(base: _Source, target: _Source, entries: Entries, name: str, sink: BinaryIO) -> None:
    """Write target - base for one tensor, in WIDE. Records the base's fingerprint and how many
    elements apply would not reproduce exactly (expected: none)."""
    entry, digest, inexact = entries[name], hashlib.blake2b(digest_size=16), 0
    with base.reader(name) as read_base, target.reader(name) as read_target:
        for lo, hi, cols in _chunks(target.meta[name][0], entry.get("base_rows")):
            t = read_target(lo, hi).reshape(hi - lo, cols)
            if lo < entry.get("base_rows", hi):
                b = read_base(lo, hi).reshape(hi - lo, cols)
                digest.update(_raw(b))
                b = b.to(WIDE)
                d = t.to(WIDE) - b
                inexact += int((_combine(b, d, t.dtype) != t).sum())
            else:  # rows the base lacks (added tokens): the target's own values
                d = t.to(WIDE)
            sink.write(_raw(d))
    entry["base_blake2b"], entry["inexact"] = digest.hexdigest(), inexact


def _add(base: _Source, delta: _Source, entries: Entries, name: str, sink: BinaryIO) -> None:
    """Write base + delta for one tensor, in the target's dtype; checks the base's fingerprint."""
    entry, digest = entries[name], hashlib.blake2b(digest_size=16)
    dtype = getattr(torch, entry["dtype"])
    with base.reader(name) as read_base, delta.reader(name) as read_delta:
        for lo, hi, cols in _chunks(delta.meta[name][0], entry.get("base_rows")):
            d = read_delta(lo, hi).reshape(hi - lo, cols)
            if lo < entry.get("base_rows", hi):
                b = read_base(lo, hi).reshape(hi - lo, cols)
                digest.update(_raw(b))
                sink.write(_raw(_combine(b, d, dtype)))
            else:
                sink.write(_raw(d.to(dtype)))
    if digest.hexdigest() != entry.get("base_blake2b"):
        raise VicunaSkyError(f"base tensor {name!r} differs from the base this delta was made from")


def _plan_make(base: _Source, target: _Source, vocab: int | None) -> Entries:
    """Check every target tensor against the base before any data is read."""
    entries: Entries = {}
    for name, (shape, dtype) in target.meta.items():
        if name not in base.meta:
            raise VicunaSkyError(f"tensor {name!r} is in the target but not in the base")
        entries[name] = {"dtype": dtype}
        base_shape = base.meta[name][0]
        if shape == base_shape:
            continue
        same_cols = len(shape) == len(base_shape) >= 1 and shape[1:] == base_shape[1:]
        if same_cols and shape[0] < base_shape[0]:
            raise VicunaSkyError(
                f"tensor {name!r} has fewer rows in the target than in the base "
                f"({shape[0]} < {base_shape[0]}): a delta can add vocabulary, not remove it"
            )
        if not (same_cols and base_shape[0] == vocab):
            raise VicunaSkyError(f"shape mismatch for {name!r}: base {base_shape}, target {shape}")
        entries[name]["base_rows"] = vocab
    return entries


def _plan_apply(base: _Source, delta: _Source, entries: Entries) -> None:
    if missing := sorted(entries.keys() - delta.meta.keys()):
        raise VicunaSkyError(f"delta is incomplete: tensor {missing[0]!r} is missing")
    for name, (shape, _) in delta.meta.items():
        if entries.get(name, {}).get("dtype") not in _CODES:
            raise VicunaSkyError(f"delta tensor {name!r} has no valid entry in {MARKER}")
        if name not in base.meta:
            raise VicunaSkyError(f"tensor {name!r} is in the delta but not in the base")
        rows = entries[name].get("base_rows")
        expected = (rows, *shape[1:]) if rows is not None else shape
        if base.meta[name][0] != expected:
            raise VicunaSkyError(
                f"shape mismatch for {name!r}: base {base.meta[name][0]}, the delta expects "
                f"{expected} (is this the right base model?)"
            )


def _read_marker(delta: Path) -> dict[str, Any]:
    _require_dir(delta, "delta")
    marker = read_json_object(delta / MARKER, "tensors") if (delta / MARKER).is_file() else {}
    if marker.get("format") != FORMAT:
        raise VicunaSkyError(f"{delta} is not a delta directory (no valid {MARKER})")
    if marker.get("version") != VERSION:
        raise VicunaSkyError(f"{delta}: delta format version {marker.get('version')} unsupported")
    return marker


@contextmanager
def _staging(out: Path, *inputs: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` only if the block succeeds, so a failure
    never leaves a half-written directory that looks complete. `out` must be new or empty and
    apart from the inputs (see vicuna_sky.output)."""
    check_output_dir(out, inputs, offer_overwrite=False)
    with writing_dir(out) as tmp:
        yield tmp


def _header(metas: dict[str, Meta]) -> bytes:
    """A safetensors header for tensors written back to back in this order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in metas.items():
        end = offset + math.prod(shape) * getattr(torch, dtype).itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so the data starts aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_shards(
    out: Path,
    metas: dict[str, Meta],
    fill: Callable[[str, BinaryIO], None],
    max_shard_bytes: int,
    label: str,
    progress: bool,
) -> None:
    """Write the tensors in order into safetensors shards of at most max_shard_bytes. The header
    goes first (shapes are known up front), then `fill` streams each tensor's bytes, so no
    tensor, let alone a shard, is ever whole in memory."""
    if max_shard_bytes <= 0:
        raise VicunaSkyError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    plan: list[dict[str, Meta]] = [{}]
    used = total = 0
    for name, meta in metas.items():
        size = math.prod(meta[0]) * getattr(torch, meta[1]).itemsize
        if plan[-1] and used + size > max_shard_bytes:
            plan, used = [*plan, {}], 0
        plan[-1][name], used, total = meta, used + size, total + size
    weight_map: dict[str, str] = {}
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(label, total=len(metas))
        for i, shard in enumerate(plan, 1):
            file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            file = "model.safetensors" if len(plan) == 1 else file
            with (out / file).open("wb") as sink:
                sink.write(_header(shard))
                for name in shard:
                    fill(name, sink)
                    bar.advance(task)
            weight_map |= dict.fromkeys(shard, file)
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / _LAYOUTS[0][0]).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def make_delta(
    base: Path,
    target: Path,
    out: Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `target - base` to the new directory `out`, tensor by tensor, with the target's
    config and tokenizer files and the marker apply_delta needs. Returns `out`."""
    base, target, out = Path(base), Path(target), Path(out)
    check_output_dir(out, (base, target), offer_overwrite=False)  # before any reading
    base_src, target_src = _Source(base, "base"), _Source(target, "target")
    config = (
        read_json_object(base / "config.json", "text_config")
        if (base / "config.json").is_file()
        else {}
    )
    vocab = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    entries = _plan_make(base_src, target_src, vocab)
    metas = {name: (shape, "float64") for name, (shape, _) in target_src.meta.items()}
    with _staging(out, base, target) as tmp:
        fill = partial(_subtract, base_src, target_src, entries)
        _write_shards(tmp, metas, fill, max_shard_bytes, "make delta", progress)
        inexact = sum(entry.pop("inexact") for entry in entries.values())
        identity = ("_name_or_path", "model_type", "architectures", "vocab_size")
        marker = {"format": FORMAT, "version": VERSION, "delta_dtype": "float64"}
        marker["base"] = {"dir": base.name, **{k: config[k] for k in identity if k in config}}
        marker |= {"inexact_elements": inexact, "tensors": entries}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _copy_side_files(target, tmp)
    if inexact:
        Console(stderr=True).print(f"warning: {inexact} elements will not round-trip exactly")
    return out


def apply_delta(
    base: Path,
    delta: Path,
    out: Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `base + delta` to the new directory `out`: a Hugging Face model directory
    (safetensors, in the target's dtypes, with its config and tokenizer). Returns `out`."""
    base, delta, out = Path(base), Path(delta), Path(out)
    check_output_dir(out, (base, delta), offer_overwrite=False)  # before any reading
    entries: Entries = _read_marker(delta).get("tensors", {})
    base_src, delta_src = _Source(base, "base"), _Source(delta, "delta")
    _plan_apply(base_src, delta_src, entries)
    metas = {name: (shape, entries[name]["dtype"]) for name, (shape, _) in delta_src.meta.items()}
    with _staging(out, base, delta) as tmp:
        fill = partial(_add, base_src, delta_src, entries)
        _write_shards(tmp, metas, fill, max_shard_bytes, "apply delta", progress)
        _copy_side_files(delta, tmp)
    return out
