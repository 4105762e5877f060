"""The output folder of a training run: checked before any model loads, locked while training,
cleared of earlier crashed saves, and never given a final file with less training than it holds.

- :func:`check_output_dir` (start, creates nothing): the folder can be created and written, and
  the final file's path is not a folder.
- :func:`run_lock` (the whole run): ``{output_dir}/{output_name}.lock`` holds {"pid", "host",
  "started"}; a second run with the same output name stops, naming the lock and the other PID. A
  lock whose process is gone (same host) is taken over, and said so.
- :func:`remove_stale_temps` (inside the lock): ``.tmp-*`` leftovers of killed saves, older than the lock.
- :func:`check_final_file` (start and before the final save): an existing final file whose
  ``ss_steps`` exceed this run's steps is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tsm_trainer.core.file_format import TSMFileError, read_metadata

_held: set[str] = set()  # locks held by this process (a lock naming our own PID but not here is stale)


class OutputLockedError(ValueError):
    """Another live training writes the same output name into the same folder."""


def final_path(output_dir: str, output_name: str) -> str:
    return os.path.join(output_dir, f"{output_name}.safetensors")


def lock_path(output_dir: str, output_name: str) -> str:
    return os.path.join(output_dir, f"{output_name}.lock")


def check_output_dir(path: str, output_name: str) -> None:
    """Raise ValueError (one line, naming the option) unless ``path`` is a writable folder, or can be
    created as one, and its final-file path ``{output_name}.safetensors`` is not a folder. Creates
    nothing (a probe file is written and removed)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output_dir {path}: is a file, not a folder; choose a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output_dir {path}: cannot create the folder ({existing} is a file); choose a folder")
    try:  # os.access says yes to root on read-only mounts: write for real
        with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=existing):
            pass
    except OSError as e:
        verb = "write there" if existing == os.path.abspath(path) else f"create it in {existing}"
        raise ValueError(f"--output_dir {path}: cannot {verb} ({e.strerror}); choose a writable folder") from None
    final = final_path(path, output_name)
    if os.path.isdir(final):
        raise ValueError(f"--output_name {output_name}: {final} is a folder; move it or choose another --output_name")


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _lock_owner_alive(path: str, owner: dict | None) -> bool:
    """True when the lock's process may still run (unknown counts as alive, except a lock left
    half-written more than 10 s ago, which only a killed start leaves)."""
    if owner is None:
        try:
            return time.time() - os.path.getmtime(path) < 10
        except OSError:
            return False
    if owner.get("host") != socket.gethostname():
        return True  # no way to see another machine's processes
    if owner["pid"] == os.getpid():
        return path in _held
    return _alive(owner["pid"])


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "a run that is starting (the lock is being written)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"PID {owner['pid']} on {owner.get('host', '?')}, started {started}"


@contextmanager
def run_lock(output_dir: str, output_name: str, log: Callable[[str], None] = print) -> Iterator[str | None]:
    """Hold ``{output_dir}/{output_name}.lock`` for the body; yields the lock path.

    Raises :class:`OutputLockedError` while another live process holds it. Only the main process of
    a distributed run (``RANK`` 0 or unset) locks; the others yield None."""
    path = lock_path(output_dir, output_name)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield None
        return
    os.makedirs(output_dir, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            owner = _read_lock(path)
            if _lock_owner_alive(path, owner):
                raise OutputLockedError(
                    f"{path}: another training ({_describe(owner)}) is writing '{output_name}' into {output_dir}; "
                    "wait for it, or use another --output_name / --output_dir (delete the lock only if that run "
                    "is gone)"
                ) from None
            log(f"{path}: taking over the stale lock of {_describe(owner)}, which no longer runs")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another starter took it over first; O_EXCL decides who wins
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    _held.add(path)
    try:
        yield path
    finally:
        _held.discard(path)
        owner = _read_lock(path)
        if owner is not None and owner["pid"] == os.getpid():
            os.unlink(path)


def _is_temp_of(name: str, output_name: str) -> bool | None:
    """True: a temp of this output name's saves; None: a temp of some run's save that names no run
    (final files, old state layout); False: not a temp we write."""
    if name.startswith(f".tmp-{output_name}-state-"):
        return True
    if name.startswith((".tmp-state-", ".tmp-probe-")) or (name.startswith(".tmp-") and name.endswith(".safetensors")):
        return None
    return False


def _other_live_locks(output_dir: str, own_lock: str) -> bool:
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.endswith(".lock") and path != own_lock and _lock_owner_alive(path, _read_lock(path)):
            return True
    return False


def remove_stale_temps(output_dir: str, output_name: str, lock: str, log: Callable[[str], None] = print) -> list[str]:
    """Delete the ``.tmp-*`` files and folders that killed saves left in ``output_dir``: those of
    this output name, and those that name no run while no other run holds a lock here; only ones
    older than ``lock`` (held by the caller). Returns the removed paths."""
    if not os.path.isfile(lock):
        return []
    since = os.path.getmtime(lock)
    others = None
    removed, size = [], 0
    for name in sorted(os.listdir(output_dir)):
        ours = _is_temp_of(name, output_name)
        if ours is False:
            continue
        if ours is None:
            if others is None:
                others = _other_live_locks(output_dir, lock)
            if others:
                continue  # it may be the save that run is doing right now
        path = os.path.join(output_dir, name)
        try:
            if os.lstat(path).st_mtime >= since:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                size += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
                shutil.rmtree(path)
            else:
                size += os.lstat(path).st_size
                os.unlink(path)
        except OSError:
            continue  # gone meanwhile, or not ours to delete
        removed.append(path)
    if removed:
        log(
            f"removed {len(removed)} temporary file(s) of earlier interrupted saves in {output_dir} "
            f"({size / 2**20:.1f} MiB)"
        )
    return removed


@contextmanager
def training_output(
    output_dir: str, output_name: str, steps: int, overwrite: bool, log: Callable[[str], None] = print
) -> Iterator[str | None]:
    """Everything a training run needs of its output folder before it loads a model, held for the
    body: checked, locked, cleared of stale temps, and no final file with more than ``steps``
    steps in the way (unless ``overwrite``). Yields the lock path (None on non-main processes)."""
    check_output_dir(output_dir, output_name)
    created = not os.path.isdir(output_dir)
    try:
        with run_lock(output_dir, output_name, log) as lock:
            if lock is not None:
                remove_stale_temps(output_dir, output_name, lock, log)
            check_final_file(final_path(output_dir, output_name), steps, overwrite)
            yield lock
    except BaseException:
        if created and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)  # a run refused before it wrote anything leaves no folder behind
        raise


def saved_steps(path: str) -> int | None:
    """Training steps recorded in a saved file's ``ss_steps``; None when it has none."""
    try:
        value = read_metadata(path).get("ss_steps")
    except TSMFileError:
        return None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def check_final_file(path: str, steps: int, overwrite: bool) -> None:
    """Raise ValueError unless writing a file of ``steps`` training steps to ``path`` loses no
    training: no file there, or one with at most ``steps`` steps, or ``overwrite``."""
    if overwrite or not os.path.exists(path):
        return
    held = saved_steps(path)
    if held is None:
        raise ValueError(
            f"{path} exists and records no training steps (ss_steps); pass --overwrite to replace it "
            "or choose another --output_name"
        )
    if held > steps:
        raise ValueError(
            f"{path} holds {held} training steps and this run would replace it with {steps}; pass "
            "--overwrite to replace it or choose another --output_name"
        )
