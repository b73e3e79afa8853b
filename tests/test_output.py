"""The safe-output rule (vicuna_sky.output), in process: what each check refuses and lets through,
and that a write is whole or not at all. tests/test_outputs_never_inputs.py holds every command
to it through the CLI; these are the same rules, fast enough to run against every mutant."""

import os
from pathlib import Path

import pytest

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.output import (
    check_dir_place,
    check_output_dir,
    check_output_file,
    write_text,
    writing,
    writing_dir,
)


@pytest.fixture
def place(tmp_path) -> Path:
    (tmp_path / "in.json").write_text("input")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text("a")
    (tmp_path / "file").write_text("not a directory")
    return tmp_path


def contents(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


# -- check_output_file -----------------------------------------------------------------------
def test_an_output_file_that_is_an_input_is_refused_however_it_is_spelled(place):
    (place / "link.json").symlink_to(place / "in.json")
    os.link(place / "in.json", place / "hard.json")
    spellings = [
        place / "in.json",
        place / "data" / ".." / "in.json",
        place / "link.json",
        place / "hard.json",
        place / "data" / "a.json",  # inside an input directory
        place / "data" / "new.json",
    ]
    for output in spellings:
        with pytest.raises(VicunaSkyError, match="is an input of this command"):
            check_output_file(output, [place / "in.json", place / "data"], overwrite=True)


def test_an_input_file_guards_only_itself(place):
    """A file input is no directory: a new file beside it is fine, with or without the input
    spelled through a symlink."""
    (place / "link.json").symlink_to(place / "in.json")
    for inputs in ([place / "in.json"], [place / "link.json"]):
        assert check_output_file(place / "out.json", inputs) == place / "out.json"
    assert check_output_file(str(place / "out.json"), []) == place / "out.json"


def test_a_new_output_beside_an_input_is_fine_whichever_way_its_name_sorts(place):
    for name in ("a.json", "in.jsom", "in.json2", "z.json"):
        assert check_output_file(place / name, [place / "in.json"]) == place / name


def test_an_output_under_an_input_file_is_under_a_file(place):
    with pytest.raises(VicunaSkyError, match=f"{place / 'in.json'} is a file, not a directory"):
        check_output_file(place / "in.json" / "out.json", [place / "in.json"])


def test_the_flags_are_given_by_name(place):
    """`check_output_file(path, inputs, True)` is no way to say overwrite (nor resumable)."""
    (place / "out.json").write_text("old")
    with pytest.raises(TypeError):
        check_output_file(place / "out.json", [], True)
    with pytest.raises(TypeError):
        check_output_dir(place / "data", [], True)
    assert check_output_file(path=place / "out.json", inputs=[place / "in.json"], overwrite=True)
    assert check_output_dir(path=place / "data", inputs=[place / "in.json"], overwrite=True)


def test_missing_or_unset_inputs_are_not_inputs(place):
    out = place / "out.json"
    assert check_output_file(out, [None, "", place / "gone.json"]) == out
    assert check_output_dir(place / "outdir", [None, "", place / "gone"]) == place / "outdir"


def test_an_existing_output_file_needs_overwrite_or_is_the_commands_own_record(place):
    out = place / "out.json"
    out.write_text("old")
    with pytest.raises(VicunaSkyError, match=r"out\.json exists: pass --overwrite to replace it"):
        check_output_file(out)
    assert check_output_file(out, overwrite=True) == out
    assert check_output_file(out, resumable=True) == out
    assert out.read_text() == "old"  # a check writes nothing


def test_a_dangling_symlink_output_counts_as_existing(place):
    (place / "dangling").symlink_to(place / "nowhere")
    with pytest.raises(VicunaSkyError, match="exists: pass --overwrite"):
        check_output_file(place / "dangling")
    # With --overwrite the link is replaced by the file, as any existing output is.
    assert check_output_file(place / "dangling", overwrite=True) == place / "dangling"
    write_text(place / "dangling", "new")
    assert not (place / "dangling").is_symlink() and (place / "dangling").read_text() == "new"
    assert not (place / "nowhere").exists()


def test_a_directory_cannot_be_made_where_a_dangling_symlink_is(place):
    (place / "dangling").symlink_to(place / "nowhere")
    for check in (check_dir_place, check_output_dir):
        with pytest.raises(VicunaSkyError, match=r"dangling: it is a broken symlink$"):
            check(place / "dangling")
    with pytest.raises(VicunaSkyError, match="broken symlink"):
        check_output_dir(place / "dangling", overwrite=True)


def test_an_output_file_cannot_be_a_directory_or_under_a_file(place):
    with pytest.raises(VicunaSkyError, match="Is a directory; give a file name"):
        check_output_file(place / "data", overwrite=True)
    for output in (place / "file" / "out.json", place / "file" / "deeper" / "out.json"):
        with pytest.raises(VicunaSkyError, match=f"{place / 'file'} is a file, not a directory"):
            check_output_file(output)


def test_an_output_file_under_new_directories_is_fine(place):
    out = place / "new" / "deeper" / "out.json"
    assert check_output_file(out) == out
    assert not (place / "new").exists()  # created when written, not when checked


def test_an_output_under_a_broken_symlink_is_refused(place):
    (place / "broken").symlink_to(place / "nowhere")
    with pytest.raises(VicunaSkyError, match=f"{place / 'broken'} is a broken symlink"):
        check_output_file(place / "broken" / "out.json")
    with pytest.raises(VicunaSkyError, match="is a broken symlink"):
        check_output_dir(place / "broken" / "sub" / "outdir")


# -- check_output_dir ------------------------------------------------------------------------
def test_an_output_directory_may_not_be_hold_or_sit_inside_an_input(place):
    for output, inputs in [
        (place / "data", [place / "data"]),
        (place / "data" / "sub", [place / "data"]),
        (place, [place / "in.json"]),  # holds an input
        (place / "data", [place / "data" / "a.json"]),
    ]:
        with pytest.raises(VicunaSkyError, match="overlaps the input"):
            check_output_dir(output, inputs, overwrite=True)
    assert check_output_dir(place / "outdir", [place / "data", place / "in.json"])


def test_an_output_directory_that_exists(place):
    (place / "empty").mkdir()
    assert check_output_dir(place / "empty") == place / "empty"
    with pytest.raises(
        VicunaSkyError, match="data already exists and is not empty: pass --overwrite to replace"
    ):
        check_output_dir(place / "data")
    with pytest.raises(VicunaSkyError, match=r"already exists and is not empty$"):
        check_output_dir(place / "data", offer_overwrite=False)
    assert check_output_dir(place / "data", overwrite=True) == place / "data"
    with pytest.raises(VicunaSkyError, match="file is a file, not a directory"):
        check_output_dir(place / "file", overwrite=True)
    with pytest.raises(VicunaSkyError, match="is a file, not a directory"):
        check_output_dir(place / "file" / "outdir")


def test_check_dir_place(place):
    assert check_dir_place(place / "data") == place / "data"  # the command decides what stays
    assert check_dir_place(str(place / "new" / "dir")) == place / "new" / "dir"
    with pytest.raises(VicunaSkyError, match="file is a file, not a directory"):
        check_dir_place(place / "file")
    with pytest.raises(VicunaSkyError, match=f"{place / 'file'} is a file, not a directory"):
        check_dir_place(place / "file" / "dir")


# -- writing ---------------------------------------------------------------------------------
def test_write_text_replaces_whole_and_keeps_the_mode(place):
    out = place / "out.txt"
    assert write_text(out, "first ü") == out
    assert out.read_bytes() == "first ü".encode()
    out.chmod(0o640)
    write_text(str(out), "second")
    assert out.read_text() == "second" and out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in place.iterdir()) == ["data", "file", "in.json", "out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(place):
    out = place / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), writing(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed halfway")
    assert out.read_text() == "old"
    assert sorted(p.name for p in place.iterdir()) == ["data", "file", "in.json", "out.txt"]


def test_an_os_error_while_writing_is_one_line(place):
    with (
        pytest.raises(VicunaSkyError, match=f"^cannot write {place / 'out.txt'}: "),
        writing(place / "out.txt") as tmp,
    ):
        (tmp / "x").write_text("the temporary is no directory")
    with pytest.raises(VicunaSkyError, match=r"^cannot write .*: [^\n]+$"):
        write_text(place / "file" / "out.txt", "under a file")


def test_writing_dir_creates_a_new_directory_whole(place):
    out = place / "outdir"
    with writing_dir(out) as tmp:
        (tmp / "x.txt").write_text("x")
        assert not out.exists()
    assert contents(out) == {"x.txt": "x"}
    assert sorted(p.name for p in place.iterdir()) == ["data", "file", "in.json", "outdir"]


def test_writing_dir_replaces_only_with_overwrite(place):
    with (
        pytest.raises(VicunaSkyError, match=f"cannot write {place / 'data'}: "),
        writing_dir(place / "data") as tmp,
    ):
        (tmp / "b.json").write_text("b")
    assert contents(place / "data") == {"a.json": "a"}
    with writing_dir(place / "data", overwrite=True) as tmp:
        (tmp / "b.json").write_text("b")
    assert contents(place / "data") == {"b.json": "b"}
    assert sorted(p.name for p in place.iterdir()) == ["data", "file", "in.json"]


def test_writing_dir_into_an_empty_directory(place):
    (place / "empty").mkdir()
    for overwrite in (False, True):
        with writing_dir(place / "empty", overwrite=overwrite) as tmp:
            (tmp / "x.txt").write_text(str(overwrite))
        assert contents(place / "empty") == {"x.txt": str(overwrite)}
        (place / "empty" / "x.txt").unlink()
    assert sorted(p.name for p in place.iterdir()) == ["data", "empty", "file", "in.json"]


def test_a_block_that_fails_replaces_nothing(place):
    full = f"^cannot write {place / 'data'}: No space left on device$"  # the reason, no errno
    with (
        pytest.raises(VicunaSkyError, match=full),
        writing_dir(place / "data", overwrite=True) as tmp,
    ):
        (tmp / "b.json").write_text("b")
        raise OSError(28, "No space left on device")
    assert contents(place / "data") == {"a.json": "a"}
    with (
        pytest.raises(VicunaSkyError, match=f"^cannot write {place / 'new'}: No space left"),
        writing_dir(place / "new") as tmp,
    ):
        raise OSError(28, "No space left on device")
    with (
        pytest.raises(VicunaSkyError, match=f"^cannot write {place / 'f'}: No space left on dev"),
        writing(place / "f"),
    ):
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in place.iterdir()) == ["data", "file", "in.json"]


def test_when_the_new_directory_cannot_take_its_place_the_old_one_goes_back(place):
    """The old directory is moved aside before the new one is renamed in; when that rename fails
    (here the new one is gone by then), the old one is put back, whole."""
    with (
        pytest.raises(VicunaSkyError, match=f"cannot write {place / 'data'}: "),
        writing_dir(place / "data", overwrite=True) as tmp,
    ):
        (tmp / "b.json").write_text("b")
        tmp.rename(place / "elsewhere")
    assert contents(place / "data") == {"a.json": "a"}
    assert sorted(p.name for p in place.iterdir()) == ["data", "elsewhere", "file", "in.json"]
