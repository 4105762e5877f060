"""Atomic file and folder writes (tsm_trainer/core/atomic_write.py)."""

import os

import pytest

from tsm_trainer.core import atomic_write
from tsm_trainer.core.atomic_write import atomic_file, atomic_folder, umask_mode


def test_a_file_write_replaces_the_file_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"  # missing folders are made
    with atomic_file(path, suffix=".json") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "sub") and tmp.endswith(".json")
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["a.json"]
    assert os.stat(path).st_mode & 0o777 == umask_mode()


def test_an_interrupted_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_file(path, suffix=".safetensors") as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.safetensors"]


def test_a_folder_write_replaces_the_old_folder_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_folder(out) as tmp:
        assert os.path.basename(tmp).startswith(".tmp-model-")
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["model"]
    assert os.stat(out).st_mode & 0o777 == umask_mode(0o777)


def test_an_interrupted_folder_write_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_folder(out) as tmp:
        (tmp_path / tmp / "half.txt").write_text("x")
        raise OSError("disk full")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["model"]


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first moves the old folder aside; the second (new -> out) fails
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(atomic_write.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_folder(out) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["model"]
