"""Bad input never loses data: `vicuna-sky data clean|split|stats` with outputs that are inputs,
exist, are directories or unwritable, bad numbers, Ctrl-C, SIGTERM and SIGKILL (issue #20)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vicuna_sky.data.parallel import default_workers, parallel_map

ANSWER = '<div class="markdown prose w-full"><p>{}</p></div>'
UMASK = os.umask(0o022)
os.umask(UMASK)


def sample(i: int, text: str = "Use sorted(xs) to get a new sorted list.") -> dict:
    return {
        "id": f"s{i}",
        "conversations": [
            {"from": "human", "value": f"Question {i}: how do I sort a list in Python?"},
            {"from": "gpt", "value": ANSWER.format(f"{text} ({i})")},
        ],
    }


@pytest.fixture
def data_in(tmp_path) -> Path:
    path = tmp_path / "in.json"
    path.write_text(json.dumps([sample(i) for i in range(20)]))
    return path


def one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert text in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_clean_output_equal_to_input_is_refused(cli, data_in):
    before = data_in.read_bytes()
    for output in (str(data_in), f"./{data_in.name}"):
        one_line_error(cli("data", "clean", str(data_in), "-o", output), "is an input")
        one_line_error(
            cli("data", "clean", str(data_in), "-o", output, "--overwrite"), "is an input"
        )
    link = data_in.parent / "link.json"
    link.symlink_to(data_in)
    one_line_error(
        cli("data", "clean", str(data_in), "-o", str(link), "--overwrite"), "is an input"
    )
    assert data_in.read_bytes() == before


def test_split_output_equal_to_input_is_refused(cli, data_in, llama2_path):
    before = data_in.read_bytes()
    result = cli("data", "split", str(data_in), "-o", str(data_in), "--tokenizer",
                 str(llama2_path), "--max-length", "64", "--overwrite")  # fmt: skip
    one_line_error(result, "is an input")
    assert data_in.read_bytes() == before


def test_existing_output_needs_overwrite_and_keeps_its_mode(cli, data_in, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("my notes")
    out.chmod(0o640)
    one_line_error(cli("data", "clean", str(data_in), "-o", str(out)), "pass --overwrite")
    assert out.read_text() == "my notes"
    result = cli("data", "clean", str(data_in), "-o", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(out.read_text())) == 20
    assert out.stat().st_mode & 0o777 == 0o640


def test_new_output_has_ordinary_permissions(cli, data_in, tmp_path):
    out = tmp_path / "new" / "out.json"
    assert cli("data", "clean", str(data_in), "-o", str(out)).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o666 & ~UMASK
    assert [p.name for p in out.parent.iterdir()] == ["out.json"]


@pytest.mark.parametrize(
    ("where", "text"),
    [
        ("dir", "Is a directory"),
        ("under-file", "is a file, not a directory"),
        ("unwritable", "no permission"),
    ],
)
def test_output_places_that_cannot_be_written(cli, data_in, tmp_path, where, text):
    if where == "unwritable" and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    output = {
        "dir": tmp_path / "dir",
        "under-file": tmp_path / "file" / "out.json",
        "unwritable": locked / "out.json",
    }[where]
    one_line_error(cli("data", "clean", str(data_in), "-o", str(output)), text)
    assert (tmp_path / "file").read_text() == "x" and list((tmp_path / "dir").iterdir()) == []


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["clean", "IN", "-o", "OUT", "--workers", "-3"], "Invalid value for '--workers'"),
        (["clean", "IN", "-o", "OUT", "--min-chars", "-1"], "Invalid value for '--min-chars'"),
        (["stats", "IN", "--tokenizer", "TOK", "--max-length", "-1"], "'--max-length'"),
        (["split", "IN", "-o", "OUT", "--tokenizer", "TOK", "--max-length", "0"], "--max-length"),
        (["split", "IN", "-o", "OUT", "--tokenizer", "TOKFILE", "--max-length", "64"], "is a file"),
    ],
)
def test_bad_numbers_and_tokenizer_files(cli, data_in, tmp_path, llama2_path, args, text):
    places = {
        "IN": str(data_in),
        "OUT": str(tmp_path / "out.json"),
        "TOK": str(llama2_path),
        "TOKFILE": str(llama2_path / "tokenizer.json"),
    }
    one_line_error(cli("data", *[places.get(a, a) for a in args]), text)
    assert not (tmp_path / "out.json").exists()


def test_split_never_writes_an_empty_conversation(cli, tmp_path, llama2_path):
    data = [sample(1), {"id": "empty", "conversations": []},
            {"id": "sys", "conversations": [{"from": "system", "value": "Be brief."}]}]  # fmt: skip
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    result = cli("data", "split", str(src), "-o", str(out), "--tokenizer", str(llama2_path),
                 "--max-length", "256")  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert [s["id"] for s in written] == ["s1"]
    assert all(s["conversations"] for s in written)
    assert "no human/gpt round" in result.stderr


def _pid_of(_item: int) -> int:
    time.sleep(0.01)
    return os.getpid()


def test_workers_are_capped_at_the_cores():
    pids = set(parallel_map(_pid_of, list(range(200)), workers=200, show_progress=False))
    assert 1 <= len(pids) <= default_workers()
    with pytest.raises(ValueError, match="workers must be >= 0"):
        parallel_map(_pid_of, [1, 2], workers=-3, show_progress=False)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from checkpoints_sync.atomic import atomic_file
with atomic_file(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"[half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_temporary_is_removed_by_the_next_run(cli, data_in, tmp_path):
    out = tmp_path / "out.json"
    assert subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)]).returncode == -9
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.json.")]) == 1
    assert cli("data", "clean", str(data_in), "-o", str(out)).returncode == 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.json.")] == []


@pytest.fixture
def slow_input(tmp_path) -> Path:
    """Enough HTML for a parallel clean to take a while on two cores."""
    text = "<p>" + "Sorting <b>lists</b> with <code>sorted</code>. " * 60 + "</p>"
    path = tmp_path / "big.json"
    path.write_text(json.dumps([sample(i, text) for i in range(40_000)]))
    return path


def _start_clean(slow_input: Path, out: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    exe = Path(sys.executable).parent / "vicuna-sky"
    proc = subprocess.Popen(
        [str(exe), "data", "clean", str(slow_input), "-o", str(out), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a process group of its own, as a shell job has
        # An interactive shell's job gets Ctrl-C; a test runner may have been started with
        # SIGINT ignored, which its children would inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children(recursive=True)
        if len(children) >= 2:
            time.sleep(0.5)  # workers busy with chunks
            return proc, psutil.Process(proc.pid).children(recursive=True)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("the workers never started")


def _gone(processes: list[psutil.Process], timeout: float = 15) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupting_a_parallel_clean_ends_it_cleanly(slow_input, tmp_path, how):
    out = tmp_path / "out.json"
    proc, workers = _start_clean(slow_input, out)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the whole job
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read().decode()
    assert code == (130 if how == "ctrl-c" else 143), stderr
    assert "Traceback" not in stderr
    assert _gone(workers, timeout=5)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["big.json"]


HALF_SENT_RESULT = """
import gc, os, signal, struct, sys, time
from multiprocessing.queues import SimpleQueue
from vicuna_sky.data.parallel import parallel_map

def half_sent(i):
    if i == 0:
        # What a worker killed half-way through sending a chunk's result leaves in the pipe:
        # a header that promises a megabyte, and ten bytes of it. Then Ctrl-C.
        results = next(o for o in gc.get_objects() if isinstance(o, SimpleQueue))
        os.write(results._writer.fileno(), struct.pack("!i", 1_000_000) + b"x" * 10)
        os.kill(os.getppid(), signal.SIGINT)
    time.sleep(600)

try:
    parallel_map(half_sent, [0, 1], workers=2, show_progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_a_worker_killed_half_way_through_its_result_does_not_hang_the_exit(tmp_path):
    """The cause of the Ctrl-C hang (issue #30), made certain: the pool's manager thread read
    a partial result and waited for the rest forever, and the exit waited for that thread."""
    if default_workers() < 2:
        pytest.skip("needs two cores")
    proc = subprocess.Popen(
        [sys.executable, "-c", HALF_SENT_RESULT],
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130, proc.stderr.read().decode()


def test_sigkill_of_the_parent_leaves_no_worker(slow_input, tmp_path):
    proc, workers = _start_clean(slow_input, tmp_path / "out.json")
    proc.kill()
    proc.wait(10)
    assert _gone(workers), [w.pid for w in workers]
