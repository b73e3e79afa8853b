"""A recipe's local data file goes to the bucket under a key made from all of its content
(launch/data_push.py): an edited dataset is uploaded again and trained on, the same one never
twice."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.data_push import check_format, content_key, describe, push

ROOT = Path(__file__).resolve().parents[2]


def dataset(path: Path, megabytes: float) -> Path:
    """A ShareGPT file of about `megabytes` MiB."""
    turn = {"from": "gpt", "value": "x" * 1000}
    count = int(megabytes * 2**20 / 1100) + 1
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": "hi"}, turn]}
             for i in range(count)]  # fmt: skip
    path.write_text(json.dumps(convs))
    return path


def test_an_edit_anywhere_in_the_file_is_a_new_upload(tmp_path):
    """A 3 MiB dataset edited near its end (past the first MiB a hash could stop at): a new
    key, uploaded again, and the key is the hash of every byte."""
    data = dataset(tmp_path / "train.json", 3)
    bucket = tmp_path / "bucket"
    first = push(data, str(bucket))
    assert first.uploaded and first.bytes == data.stat().st_size > 2 * 2**20
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    assert first.key == f"data/sha256-{digest}/train.json"
    assert (bucket / first.key).read_bytes() == data.read_bytes()
    assert not push(data, str(bucket)).uploaded  # the same content: never twice

    raw = bytearray(data.read_bytes())
    raw[-20] = ord("y") if raw[-20] == ord("x") else ord("x")  # one byte, near the end
    data.write_bytes(bytes(raw))
    second = push(data, str(bucket))
    assert second.key != first.key and second.uploaded
    assert (bucket / second.key).read_bytes() == bytes(raw)
    assert content_key(data) == second.key


def test_a_dry_run_uploads_nothing_and_says_so(tmp_path):
    data = dataset(tmp_path / "train.json", 0.01)
    pushed = push(data, str(tmp_path / "bucket"), dry_run=True)
    assert pushed.uploaded and not (tmp_path / "bucket" / pushed.key).exists()
    said = describe(pushed, "s3://mine", dry_run=True)
    assert said == f"data: would upload {data} ({pushed.bytes} B) to s3://mine/{pushed.key}"
    big = push(dataset(tmp_path / "big.json", 1.5), str(tmp_path / "bucket"))
    assert f"({big.bytes / 2**20:.1f} MiB)" in describe(big, "s3://mine/")
    assert "already in the bucket" in describe(push(big.source, str(tmp_path / "bucket")), "b")


def test_data_that_is_not_sharegpt_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text(json.dumps([{"text": "no conversations here"}]))
    with pytest.raises(VicunaSkyError) as e:
        check_format(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    good = ROOT / "tests" / "fixtures" / "fastchat" / "dummy_conversation.json"
    assert check_format(good) == len(json.loads(good.read_text()))


def test_a_bucket_that_cannot_be_written_is_one_line(tmp_path):
    data = dataset(tmp_path / "train.json", 0.01)
    (tmp_path / "bucket").write_text("a file where the bucket's folder must be")
    with pytest.raises(VicunaSkyError, match=f"cannot upload {data} to ") as e:
        push(data, str(tmp_path / "bucket"))
    assert "\n" not in str(e.value)
