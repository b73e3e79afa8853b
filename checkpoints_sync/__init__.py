"""Atomic, asynchronous checkpoint storage on S3, GCS and local disk (no torch dependency).

store = open_store("s3://bucket/runs/vicuna-7b")    # or gs://..., file:///...
checkpoints = Checkpoints(store)
uploader = AsyncUploader(checkpoints, keep=2)
uploader.submit(Path("ckpt/step-100"), 100)         # returns at once
...
uploader.wait()                                      # before exiting
step = checkpoints.restore_latest(Path("resume"))   # newest committed and verified
"""

from checkpoints_sync.checkpoints import Checkpoints, CorruptCheckpoint
from checkpoints_sync.factory import open_store
from checkpoints_sync.manifest import Manifest
from checkpoints_sync.store import NotFound, ObjectInfo, Store, StoreError
from checkpoints_sync.uploader import AsyncUploader, UploadResult

__all__ = [
    "AsyncUploader",
    "Checkpoints",
    "CorruptCheckpoint",
    "Manifest",
    "NotFound",
    "ObjectInfo",
    "Store",
    "StoreError",
    "UploadResult",
    "open_store",
]
