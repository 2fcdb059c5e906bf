"""Output files: checked before the work, written atomically, never through a link."""
import os

import pytest

from clipkit.core.errors import InputError
from clipkit.core.outputs import (atomic_dir, check_output_dir, check_output_file, open_log, recover_dir,
                                  write_bytes_atomic, write_text_atomic)


def test_write_atomic_replaces_links_never_follows(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("keep")
    os.symlink(outside / "victim", out / "a.txt")
    with pytest.raises(InputError, match="refusing to overwrite"):
        check_output_file(out / "a.txt")
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_bytes_atomic(out / "a.txt", b"new")
    write_bytes_atomic(out / "a.txt", b"new", overwrite=True)
    assert (outside / "victim").read_text() == "keep"
    assert not os.path.islink(out / "a.txt") and (out / "a.txt").read_bytes() == b"new"
    assert sorted(os.listdir(out)) == ["a.txt"]                # no temporary left behind
    with pytest.raises(InputError, match="one of the inputs"):
        check_output_file(out / "a.txt", overwrite=True, inputs=[out / "a.txt"])


def test_check_output_file_refusals(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output_file(tmp_path / "d", overwrite=True)
    with pytest.raises(InputError, match="not a file name"):
        check_output_file(tmp_path / "..")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="one of the inputs"):      # an image inside an input folder
        check_output_file(tmp_path / "imgs" / "a.png", overwrite=True, inputs=[tmp_path / "imgs"])
    new = check_output_file(tmp_path / "new" / "sub" / "o.csv")      # parents are created
    assert new.parent.is_dir() and not new.exists()


def test_write_atomic_refuses_an_existing_file_and_leaves_no_temporary(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "one")
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_text_atomic(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "one"

    def boom(t):
        t.write_text("half")
        raise RuntimeError("killed")
    from clipkit.core.outputs import write_atomic
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "b.txt", boom)
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_atomic_dir_replaces_whole_folders_and_recovers_a_swap(tmp_path):
    target = tmp_path / "idx"
    with atomic_dir(target) as d:
        (d / "x").write_text("1")
    with pytest.raises(InputError, match="refusing to overwrite"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as d:
            (d / "y").write_text("2")
            raise RuntimeError("killed")
    assert sorted(os.listdir(target)) == ["x"] and sorted(os.listdir(tmp_path)) == ["idx"]
    os.replace(target, tmp_path / "idx.old")             # killed between the two renames of a swap
    recover_dir(target)
    assert (target / "x").read_text() == "1" and not (tmp_path / "idx.old").exists()


def test_check_output_dir_and_open_log(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        check_output_dir(tmp_path / "f")
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "real.log").write_text("")
    os.symlink(tmp_path / "real.log", tmp_path / "link.log")
    with pytest.raises(InputError, match="symbolic link"):
        open_log(tmp_path / "link.log", append=True)
    with open_log(tmp_path / "new.log", append=False) as f:
        f.write("a\n")
    assert (tmp_path / "new.log").read_text() == "a\n"
