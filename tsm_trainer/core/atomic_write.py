"""Atomic writes: everything is written under a temp name in the target's folder, then renamed, so
a reader (or a crash) never sees a half-written file or folder.

* :func:`atomic_file`: yields a temp file path; on success it is fsynced and ``os.replace``-d over
  the target.
* :func:`atomic_folder`: yields a temp folder; on success an existing target is renamed aside,
  the temp folder takes its name, and the old one is deleted (the old one is put back if the
  rename fails).

On an exception inside the ``with`` block the temp is deleted and the target is left as it was.
Temp names start with ``.tmp-`` (``training/output_dir.py`` removes those that killed runs left).
``tempfile`` creates 0o600 / 0o700 entries; both give the result the umask's mode instead, since
LoRAs, workflows and models are shared with UIs that may run as another user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open``/``mkdir`` would give (0o644 / 0o755 under umask 022)."""
    try:
        with open("/proc/self/status") as f:  # reading the umask without setting it (thread-safe)
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return mode & ~umask


def _parent(path: str | os.PathLike) -> tuple[str, str]:
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return path, folder


@contextmanager
def atomic_file(path: str | os.PathLike, prefix: str = ".tmp-", suffix: str = "", fsync: bool = True) -> Iterator[str]:
    """Yield a temp path in ``path``'s folder to write to; ``path`` is replaced only on success.

    Args:
        suffix: the temp name's ending, for writers that pick the format from it (``.png``).
        fsync: flush the data to disk before the rename (off for caches, which a crash only costs
            a recomputation).
    """
    path, folder = _parent(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike, prefix: str | None = None) -> Iterator[str]:
    """Yield a temp folder beside ``path``; it becomes ``path`` only on success.

    Args:
        prefix: temp name prefix (default ``.tmp-{basename}-``); the old folder is moved aside as
            ``{prefix}old-*`` while the new one takes its place.
    """
    path, folder = _parent(path)
    prefix = prefix or f".tmp-{os.path.basename(path)}-"
    tmp = tempfile.mkdtemp(prefix=prefix, dir=folder)
    try:
        os.chmod(tmp, umask_mode(0o777))
        yield tmp
        _replace_folder(tmp, path, prefix + "old-")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(tmp: str, path: str, old_prefix: str) -> None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=old_prefix, dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
