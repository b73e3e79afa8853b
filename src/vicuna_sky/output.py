"""Safe output: the one rule every command that writes follows.

Never delete or overwrite what the command did not create: an existing output is refused unless
the user passes `--overwrite` (or it is the command's own resumable record, which the command
checks before touching it); an output that is one of the command's inputs is always refused; a
file is written to a temporary beside it with its final permissions, then renamed over it, so a
crash or a kill leaves the old file or the new one, never half of either (and the next run of the
same command removes the temporary a kill left). Every problem is a one-line `VicunaSkyError`
raised before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from checkpoints_sync.atomic import atomic_dir, atomic_file
from vicuna_sky.errors import VicunaSkyError

OVERWRITE_HELP = "Replace an existing output (never one of the inputs)."


def _same(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)  # hard links and symlinks too
    return a.resolve() == b.resolve()


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _check_place(path: Path) -> None:
    """`path` can be created: its nearest existing ancestor is a directory we can write in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir would fail with a confusing error
            raise VicunaSkyError(f"cannot write {path}: {parent} is a broken symlink")
        parent = parent.parent
    if not parent.is_dir():
        raise VicunaSkyError(f"cannot write {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VicunaSkyError(f"cannot write {path}: no permission to write in {parent}")


def _not_a_broken_link(path: Path) -> None:
    """A directory cannot be made where a dangling symlink is (mkdir and rename fail on it)."""
    if path.is_symlink() and not path.exists():
        raise VicunaSkyError(f"cannot write {path}: it is a broken symlink")


def _inputs(inputs: Iterable[Path | str | None]) -> list[Path]:
    return [Path(p) for p in inputs if p is not None and str(p) and Path(p).exists()]


def check_output_file(
    path: Path,
    inputs: Iterable[Path | str | None] = (),
    *,
    overwrite: bool = False,
    resumable: bool = False,
) -> Path:
    """Refuse, before anything is written: an output that is an input, a directory, a path under
    a file or in an unwritable directory, and an existing file unless `overwrite` or `resumable`
    (the command's own record, which it validates before it appends)."""
    path = Path(path)
    for source in _inputs(inputs):
        if _same(path, source) or (source.is_dir() and _inside(path, source)):
            raise VicunaSkyError(f"{path} is an input of this command: write the output elsewhere")
    if path.is_dir():
        raise VicunaSkyError(f"cannot write {path}: Is a directory; give a file name")
    _check_place(path)
    if path.exists() or path.is_symlink():
        if not (overwrite or resumable):
            raise VicunaSkyError(f"{path} exists: pass --overwrite to replace it")
        # A dangling symlink is replaced by the new file: only an existing target can refuse.
        if path.exists() and not os.access(path, os.W_OK):
            raise VicunaSkyError(f"cannot write {path}: no permission")
    return path


def check_output_dir(
    path: Path,
    inputs: Iterable[Path | str | None] = (),
    *,
    overwrite: bool = False,
    offer_overwrite: bool = True,
) -> Path:
    """The same for a directory the command creates: it must not exist, or be empty, or (with
    `overwrite`) be replaced; it may not be, hold or sit inside an input."""
    path = Path(path)
    for source in _inputs(inputs):
        if _same(path, source) or _inside(path, source) or _inside(source, path):
            raise VicunaSkyError(f"{path} overlaps the input {source}: write the output elsewhere")
    if path.exists() and not path.is_dir():
        raise VicunaSkyError(f"{path} is a file, not a directory")
    _not_a_broken_link(path)
    _check_place(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        hint = ": pass --overwrite to replace it" if offer_overwrite else ""
        raise VicunaSkyError(f"{path} already exists and is not empty{hint}")
    return path


def check_dir_place(path: Path) -> Path:
    """A directory a command fills itself (the demo's workdir, with its own rules for what may
    already be there): it is not a file, and it can be created where it is."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VicunaSkyError(f"{path} is a file, not a directory")
    _not_a_broken_link(path)
    _check_place(path / "x" if path.is_dir() else path)
    return path


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A temporary beside `path` to write; it becomes `path` (with the mode of the file it
    replaces, or the umask's) only when the block succeeds."""
    try:
        with atomic_file(Path(path)) as tmp:
            yield tmp
    except OSError as e:
        raise VicunaSkyError(f"cannot write {path}: {e.strerror or e}") from None


def write_text(path: Path, text: str) -> Path:
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def writing_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """A new temporary directory beside `path` to fill; it becomes `path` only when the block
    succeeds. An existing non-empty `path` is replaced then, only with `overwrite` (after the
    checks of `check_output_dir`): moved aside, the new one renamed in, the old one removed."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
    try:
        with atomic_dir(path) as tmp:
            yield tmp
            if overwrite and path.is_dir() and any(path.iterdir()):
                path.rename(aside)
        if aside.exists():
            shutil.rmtree(aside)
    except OSError as e:
        if aside.exists() and not path.exists():
            aside.rename(path)  # the new one did not make it: the old one goes back
        raise VicunaSkyError(f"cannot write {path}: {e.strerror or e}") from None
