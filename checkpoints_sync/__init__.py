"""Atomic, asynchronous checkpoint storage on S3, GCS and local disk (no torch dependency)."""
