"""Atomic writes leave either the old file or the complete new one, never a partial file."""

import errno
import os

import pytest

from lightning_vrn.atomic import atomic_path, write_text


def test_completed_block_renames_into_place(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text(target, "{}")
    assert target.read_text() == "{}"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_block_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_temporary_keeps_the_suffix_for_writers_that_dispatch_on_it(tmp_path):
    with atomic_path(tmp_path / "picture.png") as temp:
        assert temp.suffix == ".png" and temp.parent == tmp_path
        temp.write_bytes(b"x")


def test_written_file_gets_the_permissions_a_plain_open_gives(tmp_path):
    write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(OSError, match=rf"no space left to write {path} \(No space left on device\)"):
        with atomic_path(path) as temp:
            temp.write_text("new, half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write on a full disk fails
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
