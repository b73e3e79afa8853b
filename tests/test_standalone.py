"""A clone stands alone: nothing in the project reaches for files beside the checkout.

tests/conftest.py also fails, at run time, any open under ../shared during the test session;
this test covers the code that runs in other processes (the CLI, benchmarks, the demo)."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `../shared`, `"shared" /`, `/ "shared"`, `parent / "shared"` and the like.
# The guard itself (tests/conftest.py) and this test name the folder in order to refuse it.
GUARDS = ("tests/conftest.py", "tests/test_standalone.py")
BESIDE = re.compile(r"\.\./shared|[\"']shared[\"']\s*/|/\s*[\"']shared[\"']|[\"']shared/data")


def test_no_file_reads_beside_the_checkout():
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    code = [
        p
        for p in tracked
        if p.endswith((".py", ".yaml", ".yml", ".toml", ".sh", ".cfg"))
        or Path(p).name in ("Makefile", "run")
    ]
    assert len(code) > 50
    offenders = [
        f"{path}:{n}"
        for path in code
        if path not in GUARDS
        for n, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if BESIDE.search(line)
    ]
    assert offenders == []


def test_the_guard_refuses_reads_beside_the_checkout():
    import pytest

    with pytest.raises(PermissionError, match="inside the repository"):
        (ROOT.parent / "shared" / "anything.txt").open()
