"""The one atomic writer every jaxquant file goes through."""

import os

import pytest

from jaxquant.atomic_files import atomic_write, atomic_write_bytes


def test_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(str(path), b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")

    def broken(f):
        f.write(b"half of the new cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "new.bin", broken)
    assert os.listdir(tmp_path) == ["a.bin"]
