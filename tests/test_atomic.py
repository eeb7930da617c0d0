"""speechlm.atomic: an output appears only by rename, and an error leaves the old one in place."""

import json
import os

import pytest

from speechlm import atomic


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if ".partial" in p.name]


def test_replaces_a_file(tmp_path):
    path = tmp_path / "sub" / "out.json"  # the parent is created
    atomic.write_json(path, {"a": 1})
    assert path.read_text() == '{"a": 1}\n'
    atomic.write_text(path, "new")
    assert path.read_text() == "new"
    atomic.write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _leftovers(path.parent) == []


def test_replaces_a_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")
    with atomic.atomic_path(out, directory=True) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())  # created empty
        assert tmp.parent == out.parent and tmp.name.startswith(".")
        (tmp / "new.bin").write_bytes(b"new")
        assert (out / "old.bin").is_file()  # untouched until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert _leftovers(tmp_path) == []


def test_an_error_keeps_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert out.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_an_error_keeps_the_old_directory_and_no_temporary(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "f").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(out, directory=True) as tmp:
        (tmp / "f").write_text("half")
        raise KeyboardInterrupt  # Ctrl-C too
    assert [p.name for p in out.iterdir()] == ["f"] and (out / "f").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_temporary_names(tmp_path):
    path = tmp_path / "x.npy"
    assert atomic.partial_path(path) == tmp_path / f".x.npy.partial-{os.getpid()}"
    # per_process=False: one fixed name, so a rerun overwrites what a killed run left
    stale = atomic.partial_path(path, per_process=False)
    assert stale == tmp_path / ".x.npy.partial"
    stale.write_text("left by a killed run")
    atomic.write_json(path, [1], per_process=False)
    assert json.loads(path.read_text()) == [1]
    assert _leftovers(tmp_path) == []
