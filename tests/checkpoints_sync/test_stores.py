"""One suite, three stores: local directory, S3 (moto_server), GCS (emulator)."""

import os

import pytest

from checkpoints_sync import NotFound, StoreError, open_store


def test_round_trip(store_url, tmp_path):
    store = open_store(store_url)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    store.put_file(src, "a/b/c.bin")
    store.put_file(src, "a/other.bin")
    assert store.exists("a/b/c.bin") and not store.exists("a/missing")
    assert sorted((o.key, o.size) for o in store.list("a/")) == [
        ("a/b/c.bin", 300_000),
        ("a/other.bin", 300_000),
    ]
    store.get_file("a/b/c.bin", tmp_path / "out" / "c.bin")
    assert (tmp_path / "out" / "c.bin").read_bytes() == src.read_bytes()
    store.delete(["a/b/c.bin", "a/never-existed"])
    assert [o.key for o in store.list()] == ["a/other.bin"]
    with pytest.raises(NotFound):
        store.get_file("a/b/c.bin", tmp_path / "gone")
    assert not (tmp_path / "gone").exists()


def test_prefix_isolation(store_url, tmp_path):
    src = tmp_path / "x"
    src.write_text("x")
    open_store(store_url).put_file(src, "k")
    sibling = open_store(store_url.rstrip("/") + "-sibling")
    assert sibling.list() == []


def test_multipart_upload(store_url, tmp_path):
    """A file above the multipart threshold (S3) / chunk size (GCS) arrives whole."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(70 * 1024 * 1024))
    store = open_store(store_url)
    store.put_file(big, "big.bin")
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_bad_urls():
    with pytest.raises(StoreError, match="unsupported URL"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="without a bucket"):
        open_store("s3:///prefix")
