"""`python -m vicuna_sky.train.model_cache`: the base model from the run's bucket, not the hub.

A spot run is relaunched on fresh VMs, often in another region, and each relaunch would fetch
the base model from the Hugging Face hub again (13 GB for 7B, 26 GB for 13B, with HF_TOKEN and
the hub's rate limits). The first attempt that downloads a hub model copies it into the bucket
(`hub-cache/<org>--<name>/<revision>/`) through checkpoints_sync's stores, file by file, with
`COMPLETE` (the file list and sizes) written last; every later attempt, and every other run of
the same base, downloads it from the bucket instead. A copy without `COMPLETE` (a preemption in
the middle of the upload) is never read; the next attempt uploads it again.

Prints the local directory the trainer should load. Nothing here can make a run worse than the
hub would: when the cache cannot be used, it prints the model id unchanged and says why on
stderr, and the trainer goes to the hub as before.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMPLETE = "COMPLETE"
# What a model directory needs for training and export: weights, config, tokenizer. Not the
# hub's other formats (.bin twins of .safetensors, GGUF, ONNX) that repositories often carry.
PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.py",
    "tokenizer*",
]


def cache_prefix(model_id: str, revision: str) -> str:
    return f"hub-cache/{model_id.replace('/', '--')}/{revision}"


def is_hub_id(model_path: str) -> bool:
    """`org/name` that is not a directory here (a path to a model is used as it is)."""
    return (
        model_path.count("/") == 1
        and not model_path.startswith((".", "/", "~"))
        and not Path(model_path).exists()
    )


def fetch(model_id: str, bucket: str, into: Path, revision: str = "main") -> tuple[Path, str]:
    """The model in a local directory under `into`, and where it came from ("bucket" or
    "hub, then cached")."""
    from checkpoints_sync.factory import open_store
    from checkpoints_sync.store import NotFound

    store = open_store(bucket)
    prefix = cache_prefix(model_id, revision)
    local = into / model_id.replace("/", "--")
    try:
        listing = json.loads(_read(store, f"{prefix}/{COMPLETE}", local))
    except NotFound:
        listing = None
    if listing is not None:
        for name, size in listing["files"].items():
            target = local / name
            if not (target.is_file() and target.stat().st_size == size):
                target.parent.mkdir(parents=True, exist_ok=True)
                store.get_file(f"{prefix}/{name}", target)
        return local, "bucket"
    from huggingface_hub import snapshot_download

    # Into the hub's own cache (HF_HOME), as the trainer would have fetched it.
    snapshot = Path(snapshot_download(model_id, revision=revision, allow_patterns=PATTERNS))
    files = {
        str(p.relative_to(snapshot)): p.stat().st_size
        for p in sorted(snapshot.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }
    for name in files:
        store.put_file(snapshot / name, f"{prefix}/{name}")
    local.mkdir(parents=True, exist_ok=True)
    marker = local / ".complete.upload"
    marker.write_text(json.dumps({"model": model_id, "revision": revision, "files": files}))
    store.put_file(marker, f"{prefix}/{COMPLETE}")  # last: the copy is whole from now on
    marker.unlink()
    return snapshot, "hub, then cached"


def _read(store: object, key: str, local: Path) -> str:
    local.mkdir(parents=True, exist_ok=True)
    tmp = local / ".complete.download"
    store.get_file(key, tmp)
    try:
        return tmp.read_text()
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vicuna_sky.train.model_cache")
    p.add_argument("--model-path", required=True, help="a hub id or a directory")
    p.add_argument("--bucket", required=True, help="the run's bucket URL (s3://, gs://, a path)")
    p.add_argument("--into", type=Path, required=True, help="local directory for models")
    p.add_argument("--revision", default="main")
    args = p.parse_args(argv)
    if not is_hub_id(args.model_path):
        print(args.model_path)
        return
    started = time.monotonic()
    try:
        local, source = fetch(args.model_path, args.bucket, args.into, args.revision)
    except Exception as e:  # the hub or the bucket: the trainer tries the hub itself
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"model cache: not used ({type(e).__name__}: {first})", file=sys.stderr)
        print(args.model_path)
        return
    seconds = time.monotonic() - started
    print(f"model cache: {args.model_path} from the {source} in {seconds:.1f} s", file=sys.stderr)
    print(local)


if __name__ == "__main__":
    main()
