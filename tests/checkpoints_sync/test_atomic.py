"""checkpoints_sync.atomic in process: whole or nothing, ordinary modes, litter of dead writers
swept and a live writer's never (the CLI tests cover the same through push and pull)."""

import os
import subprocess
import sys

import pytest

from checkpoints_sync import atomic
from checkpoints_sync.atomic import atomic_dir, atomic_file, file_mode, sweep_litter, temp_name


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def litter(target, pid: int, suffix: str = ".tmp", directory: bool = False):
    token = "dddd" if directory else "ffff"
    path = target.with_name(f".{target.name}.{atomic._HOST}-{pid}-0123{token}{suffix}")
    if directory:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "f").write_text("x")
    else:
        path.write_text("half")
    return path


def test_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert atomic._read_umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(before)


def test_a_file_is_replaced_whole_with_the_mode_it_had(tmp_path):
    target = tmp_path / "new" / "out.json"  # the parent is made
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.json.")
        assert tmp.name.endswith(".tmp") and not target.exists()
        tmp.write_text("one")
    assert target.read_text() == "one"
    assert target.stat().st_mode & 0o7777 == 0o666 & ~atomic.UMASK
    target.chmod(0o640)
    with atomic_file(target) as tmp:
        tmp.write_text("two")
    assert target.read_text() == "two" and target.stat().st_mode & 0o7777 == 0o640
    target.chmod(0o751)  # every bit of the mode is kept, execute bits included
    with atomic_file(target) as tmp:
        tmp.write_text("two")
    assert target.stat().st_mode & 0o7777 == 0o751
    with atomic_file(target, mode=0o600) as tmp:
        tmp.write_text("three")
    assert target.stat().st_mode & 0o7777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target, suffix=".part") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_file_mode_of_a_missing_file_is_what_open_gives():
    assert file_mode("/nonexistent/x") == 0o666 & ~atomic.UMASK


def test_a_directory_is_renamed_whole_onto_nothing_or_an_empty_one(tmp_path):
    target = tmp_path / "deep" / "export"
    with atomic_dir(tmp_path / "a" / "b" / "c") as tmp:  # every missing parent is made
        pass
    assert (tmp_path / "a" / "b" / "c").is_dir()
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.stat().st_mode & 0o777 == 0o777 & ~atomic.UMASK
        (tmp / "model.safetensors").write_text("w")
    assert (target / "model.safetensors").read_text() == "w"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in empty.iterdir()] == ["a"]
    with pytest.raises(OSError), atomic_dir(target, suffix=".part") as tmp:
        (tmp / "other").write_text("o")  # onto a non-empty directory: the rename fails
    assert [p.name for p in target.iterdir()] == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["export"]


def test_litter_of_dead_writers_is_swept_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "out.json"
    dead = dead_pid()
    files = [litter(target, dead), litter(target, dead, directory=True)]
    live = litter(target, os.getpid())
    other_suffix = litter(target, dead, suffix=".part")
    other_target = litter(tmp_path / "other.json", dead)
    other_host = tmp_path / f".out.json.elsewhere-{dead}-0123abcd.tmp"
    other_host.write_text("x")
    assert sorted(sweep_litter(target, ".tmp")) == sorted(files)
    assert not any(p.exists() for p in files)
    assert live.exists() and other_suffix.exists() and other_target.exists()
    assert other_host.exists()
    with atomic_file(target, suffix=".part") as tmp:  # a writer sweeps before it writes
        tmp.write_text("x")
    assert not other_suffix.exists() and live.exists()
    assert sweep_litter(tmp_path / "missing" / "x", ".tmp") == []


def test_asking_whether_a_writer_lives_sends_it_nothing(tmp_path):
    """Signal 0 only asks: a live writer (here a `sleep` that would die of a SIGHUP) is left
    running, and its temporary kept."""
    import signal

    writer = subprocess.Popen(
        ["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)
    )
    try:
        live = litter(tmp_path / "out.json", writer.pid)
        assert sweep_litter(tmp_path / "out.json", ".tmp") == []
        assert live.exists() and writer.poll() is None
    finally:
        writer.kill()
        writer.wait()


def test_alive_asks_the_kernel():
    assert atomic._alive(os.getpid()) is True and atomic._alive(dead_pid()) is False


def test_a_process_of_another_user_counts_as_alive(monkeypatch):
    def refused(pid, sig):
        raise PermissionError

    monkeypatch.setattr(atomic.os, "kill", refused)
    assert atomic._alive(1)


def test_temp_names_are_unique_and_beside_the_target(tmp_path):
    names = {temp_name(tmp_path / "x", ".tmp") for _ in range(50)}
    assert len(names) == 50 and all(n.parent == tmp_path for n in names)
    assert all(f"-{os.getpid()}-" in n.name for n in names)


def test_the_host_part_of_a_name_is_safe_and_short(monkeypatch):
    import importlib
    import socket

    try:
        monkeypatch.setattr(socket, "gethostname", lambda: "a.b-c" + "x" * 40)
        assert importlib.reload(atomic)._HOST == "a_b_c" + "x" * 27  # 32 characters
        monkeypatch.setattr(socket, "gethostname", lambda: "")
        assert importlib.reload(atomic)._HOST == "host"
    finally:
        monkeypatch.undo()
        importlib.reload(atomic)
