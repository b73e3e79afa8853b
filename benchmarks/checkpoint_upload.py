"""Benchmark: checkpoints_sync against a local S3 server (moto), side by side with plain boto3.

(a) Training-side stall of one checkpoint: a synchronous save+upload (write the files, then
    commit them) vs an asynchronous one (write the files, hand them to AsyncUploader, go on).
(b) Upload throughput: `Checkpoints.commit` (manifest with sha256 included) vs a plain loop of
    boto3 `upload_file` calls, same files, same server, same run.

The checkpoint is ~1 GiB in many files (a few large shards above the multipart threshold and
many small ones, as a sharded DCP checkpoint has). Everything stays on 127.0.0.1.

    .venv/bin/python benchmarks/checkpoint_upload.py [--mib 1024] [--small-files 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vicuna_sky.localcloud.s3_server import LocalS3

MIB = 1024 * 1024


def make_payload(total_mib: int, small_files: int) -> dict[str, bytes]:
    """Shard name -> bytes: half the volume in 8 large shards, half in many small ones."""
    large, small = total_mib // 2, total_mib - total_mib // 2
    files = {f"model/__{i}_0.distcp": os.urandom(large * MIB // 8) for i in range(8)}
    each = max(1, small * MIB // small_files)
    files |= {f"optim/__{i}_0.distcp": os.urandom(each) for i in range(small_files)}
    return files


def save(payload: dict[str, bytes], directory: Path) -> None:
    """What the trainer does either way: write the checkpoint to local disk."""
    for name, data in payload.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (directory / ".metadata").write_text("done")


def clear(s3: object, bucket: str) -> None:
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--small-files", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="medians over this many rounds")
    args = parser.parse_args()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    moto = LocalS3().__enter__()
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"] = moto.url
    import boto3

    from checkpoints_sync import AsyncUploader, Checkpoints, open_store

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        payload = make_payload(args.mib, args.small_files)
        size = sum(len(v) for v in payload.values())
        print(f"checkpoint: {size / MIB:.0f} MiB in {len(payload) + 1} files; moto at {endpoint}")
        cps = Checkpoints(open_store("s3://bench/sync"))
        save(payload, work / "warm-up")  # the first 1 GiB write pays for page-cache growth
        shutil.rmtree(work / "warm-up")

        # This machine's disk writes 1 GiB in 0.5-3 s from one write to the next, so the local
        # save (the same work in both modes) is timed on its own and its median used for both.
        saves, uploads, handovers = [], [], []
        for round_ in range(args.repeats):
            directory = work / f"sync-{round_}" / "step-1"
            os.sync()  # earlier rounds' dirty pages are flushed outside the timed window
            start = time.perf_counter()
            save(payload, directory)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            cps.commit(directory, 1)
            uploads.append(time.perf_counter() - start)
            clear(s3, "bench")

            uploader = AsyncUploader(Checkpoints(open_store("s3://bench/async")), keep=2)
            directory = work / f"async-{round_}" / "step-1"
            os.sync()
            start = time.perf_counter()
            save(payload, directory)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            uploader.submit(directory, 1)
            handovers.append(time.perf_counter() - start)
            uploader.wait()
            uploader.close()
            clear(s3, "bench")
            shutil.rmtree(directory.parent)
        saved, upload = statistics.median(saves), statistics.median(uploads)
        handover = statistics.median(handovers)
        stall_sync, stall_async = saved + upload, saved + handover

        start = time.perf_counter()
        Checkpoints(open_store("s3://bench/ours")).commit(work / "sync-0" / "step-1", 1)
        ours = time.perf_counter() - start
        clear(s3, "bench")

        start = time.perf_counter()
        root = work / "sync-0" / "step-1"
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            s3.upload_file(str(path), "bench", f"plain/{path.relative_to(root).as_posix()}")
        plain = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
        moto.__exit__()

    print(f"medians of {args.repeats} rounds per mode for (a)")
    print(f"(a) local save (both modes):       {saved:6.2f} s")
    print(
        f"    synchronous: save + upload     {stall_sync:6.2f} s of training stalled "
        f"(upload {upload:.2f} s)"
    )
    print(
        f"    async: save + hand-over        {stall_async:6.2f} s of training stalled "
        f"(hand-over {handover * 1e3:.1f} ms)"
    )
    print(f"    async stall / sync stall:      {100 * stall_async / stall_sync:.1f}%")
    print(
        f"(b) checkpoints_sync commit:       {ours:6.2f} s  {size / MIB / ours:7.1f} MiB/s "
        "(sha256 manifest included)"
    )
    print(f"    plain boto3 upload_file loop:  {plain:6.2f} s  {size / MIB / plain:7.1f} MiB/s")
    print(f"    ours / plain throughput:       {plain / ours * 100:.0f}%")


if __name__ == "__main__":
    main()
