"""Write a file or a directory whole or not at all, with ordinary permissions, and sweep up after
a writer that was killed.

The temporary sits beside the target (same filesystem, so the final rename is atomic) and is named
`.<target>.<host>-<pid>-<random><suffix>`: the next writer of the same target removes the ones
whose process on this host is gone (a SIGKILL leaves them; nothing else would ever remove them),
and never one that a live writer still owns. No dependency beyond the standard library: the CLI
of vicuna_sky shares these helpers.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path


def _read_umask() -> int:
    # Read once: changing the umask to learn it is process-wide and would race with threads
    # creating files at the same time.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def file_mode(path: Path) -> int:
    """The mode a file written at `path` should end up with: the mode of the file it replaces,
    else what `open()` would have given it (mkstemp makes temporaries 0600)."""
    try:
        return Path(path).stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~UMASK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def temp_name(path: Path, suffix: str) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def sweep_litter(path: Path, suffix: str) -> list[Path]:
    """Remove temporaries of `path` left by writers on this host that no longer run."""
    path = Path(path)
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.{re.escape(_HOST)}-(\d+)-[0-9a-f]+{re.escape(suffix)}$"
    )
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            match = pattern.match(entry.name)
            if match and not _alive(int(match.group(1))):
                litter = Path(entry.path)
                if litter.is_dir() and not litter.is_symlink():
                    shutil.rmtree(litter, ignore_errors=True)
                else:
                    litter.unlink(missing_ok=True)
                removed.append(litter)
    return removed


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = ".tmp", mode: int | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on success it gets `mode` (default:
    `file_mode(path)`) and replaces `path`; on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_litter(path, suffix)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        os.chmod(tmp, file_mode(path) if mode is None else mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a new temporary directory beside `path` to fill; on success it is renamed to `path`,
    which must not exist or be an empty directory (a non-empty one is never replaced: the rename
    fails instead). On failure the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_litter(path, suffix)
    tmp = temp_name(path, suffix)
    tmp.mkdir(mode=0o777 & ~UMASK)
    try:
        yield tmp
        os.rename(tmp, path)  # onto an empty directory is allowed; onto a non-empty one fails
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
