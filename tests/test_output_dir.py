"""The output folder of a training run: lock, start checks, overwrite guard, stale temps, file modes."""

import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from tsm_trainer.core.file_format import save_file_atomic
from tsm_trainer.training.cli import main
from tsm_trainer.training.output_dir import (
    OutputLockedError,
    check_final_file,
    check_output_dir,
    lock_path,
    remove_stale_temps,
    run_lock,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(path, pid, host=None):
    import json
    import socket

    with open(path, "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": time.time()}, f)


def test_second_run_into_the_same_output_stops_naming_the_lock_and_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(lock_path(str(tmp_path), "tsm"), sleeper.pid)
        with pytest.raises(OutputLockedError, match=rf"tsm.lock: another training \(PID {sleeper.pid} on "):
            with run_lock(str(tmp_path), "tsm"):
                pass
        with run_lock(str(tmp_path), "other"):  # another output name in the same folder is free
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_training_command_refuses_a_locked_output_before_loading_anything(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(lock_path(str(tmp_path), "tsm"), sleeper.pid)
        # the model folder is empty (unloadable): the lock must be refused before it is read
        (tmp_path / "empty-model").mkdir()
        (tmp_path / "x.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'images'\n")
        assert (
            main(
                [
                    "--pretrained_model_name_or_path",
                    str(tmp_path / "empty-model"),
                    "--dataset_config",
                    str(tmp_path / "x.toml"),
                    "--output_dir",
                    str(tmp_path),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert f"PID {sleeper.pid}" in err and "tsm.lock" in err and "empty-model" not in err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over_and_said_so(tmp_path):
    lines = []
    path = lock_path(str(tmp_path), "tsm")
    _write_lock(path, _dead_pid())
    with run_lock(str(tmp_path), "tsm", lines.append):
        import json

        assert json.load(open(path))["pid"] == os.getpid()
    assert len(lines) == 1 and "taking over the stale lock" in lines[0] and "no longer runs" in lines[0]
    assert not os.path.exists(path)  # released


def test_a_lock_of_another_host_or_of_this_process_is_respected(tmp_path):
    _write_lock(lock_path(str(tmp_path), "a"), _dead_pid(), host="another-machine")
    with pytest.raises(OutputLockedError, match="on another-machine"):
        with run_lock(str(tmp_path), "a"):
            pass
    with run_lock(str(tmp_path), "b"):
        with pytest.raises(OutputLockedError, match=f"PID {os.getpid()}"):
            with run_lock(str(tmp_path), "b"):
                pass


def test_output_dir_checks_at_start(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"^--output_dir .*file: is a file, not a folder"):
        check_output_dir(str(file), "tsm")
    with pytest.raises(ValueError, match=r"^--output_dir .*file/sub: cannot create the folder \(.*file is a file\)"):
        check_output_dir(str(file / "sub"), "tsm")
    (tmp_path / "out" / "tsm.safetensors").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^--output_name tsm: .*tsm.safetensors is a folder"):
        check_output_dir(str(tmp_path / "out"), "tsm")
    check_output_dir(str(tmp_path / "new" / "deeper"), "tsm")
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["file", "out"]  # creates nothing


def test_a_read_only_output_dir_fails_at_start(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    elif os.path.isdir("/sys/kernel"):
        folder = "/sys/kernel"  # root ignores permission bits; sysfs refuses new files even to root
    else:
        pytest.skip("no read-only folder for root here")
    with pytest.raises(ValueError, match=r"^--output_dir .*: cannot write there"):
        check_output_dir(str(folder), "tsm")
    with pytest.raises(ValueError, match=rf"^--output_dir .*/out: cannot create it in {folder} "):
        check_output_dir(os.path.join(str(folder), "out"), "tsm")


@pytest.mark.parametrize(
    "held, steps, overwrite, refused",
    [
        (10, 0, False, "holds 10 training steps and this run would replace it with 0"),
        (10, -3, False, "holds 10 training steps"),
        (10, 5, False, "holds 10 training steps"),
        (10, 10, False, None),
        (10, 20, False, None),
        (10, 0, True, None),
        (None, 20, False, "records no training steps"),
    ],
)
def test_a_final_file_with_more_training_is_not_replaced(tmp_path, held, steps, overwrite, refused):
    path = str(tmp_path / "tsm.safetensors")
    save_file_atomic({"w": torch.zeros(1)}, path, metadata={} if held is None else {"ss_steps": str(held)})
    if refused:
        with pytest.raises(ValueError, match=refused + ".*--overwrite"):
            check_final_file(path, steps, overwrite)
    else:
        check_final_file(path, steps, overwrite)


def _age(path, seconds=60):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stale_temps_of_this_run_are_removed_and_nothing_else(tmp_path):
    names = {
        ".tmp-tsm-state-4-abc": "dir",
        ".tmp-state-9-xyz": "dir",
        ".tmp-k2j3.safetensors": "file",
        ".tmp-other-state-3-q": "dir",
        ".tmp-notes": "file",
        "tsm.safetensors": "file",
        ".tmp-probe-x": "file",
    }
    for name, kind in names.items():
        p = tmp_path / name
        if kind == "dir":
            p.mkdir()
            (p / "network.safetensors").write_bytes(b"0" * 1000)
        else:
            p.write_bytes(b"0")
        _age(p)
    (tmp_path / ".tmp-tsm-state-8-new").mkdir()  # newer than the lock: left alone
    lines = []
    with run_lock(str(tmp_path), "tsm") as lock:
        os.utime(tmp_path / ".tmp-tsm-state-8-new", (time.time() + 5, time.time() + 5))
        removed = {os.path.basename(p) for p in remove_stale_temps(str(tmp_path), "tsm", lock, lines.append)}
    assert removed == {".tmp-tsm-state-4-abc", ".tmp-state-9-xyz", ".tmp-k2j3.safetensors", ".tmp-probe-x"}
    assert "removed 4 temporary file(s) of earlier interrupted saves" in lines[0]
    left = set(os.listdir(tmp_path))
    assert {".tmp-other-state-3-q", ".tmp-notes", "tsm.safetensors", ".tmp-tsm-state-8-new"} <= left


def test_temps_naming_no_run_are_kept_while_another_run_holds_a_lock(tmp_path):
    (tmp_path / ".tmp-k2j3.safetensors").write_bytes(b"0")
    _age(tmp_path / ".tmp-k2j3.safetensors")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(lock_path(str(tmp_path), "other"), sleeper.pid)
        with run_lock(str(tmp_path), "tsm") as lock:
            assert remove_stale_temps(str(tmp_path), "tsm", lock) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (tmp_path / ".tmp-k2j3.safetensors").exists()


def test_outputs_get_the_umask_mode(tmp_path):
    from tsm_trainer.data.cache import LatentCache
    from tsm_trainer.training.checkpoint import save_state

    old = os.umask(0o022)
    try:
        save_file_atomic({"w": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
        layer = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW(layer.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

        class Net:
            def save(self, path):
                save_file_atomic(layer.state_dict(), path)

        save_state(str(tmp_path / "tsm-state-1"), Net(), optimizer, scheduler, {"step": 1})
        cache = LatentCache(lambda x: x, cache_dir=str(tmp_path / "cache"))
        cache.latents([cache.key("p", "s", (8, 8), (8, 8), (0, 0), False)], lambda idx: torch.zeros(1, 3, 8, 8))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.safetensors") == 0o644
    assert mode(tmp_path / "tsm-state-1") == 0o755
    assert {mode(p) for p in (tmp_path / "tsm-state-1").iterdir()} == {0o644}
    assert {mode(p) for p in (tmp_path / "cache").iterdir()} == {0o644}


def test_the_temp_folder_of_a_killed_state_save_is_recognised_as_this_runs(tmp_path, monkeypatch):
    import tsm_trainer.training.checkpoint as checkpoint

    class Killed(BaseException):
        pass

    class Net:
        def save(self, path):
            raise Killed  # as if the process died here: the temp folder stays

    monkeypatch.setattr("tsm_trainer.core.atomic_write.shutil.rmtree", lambda *a, **k: None)
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    with pytest.raises(Killed):
        checkpoint.save_state(
            str(tmp_path / "tsm-state-1"),
            Net(),
            optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
            {"step": 1},
        )
    monkeypatch.undo()
    (left,) = os.listdir(tmp_path)
    _age(tmp_path / left)
    with run_lock(str(tmp_path), "other") as lock:  # another output name's run leaves it alone
        assert remove_stale_temps(str(tmp_path), "other", lock) == []
    assert left.startswith(".tmp-tsm-state-1-") and os.listdir(tmp_path) == [left]
    with run_lock(str(tmp_path), "tsm") as lock:
        assert remove_stale_temps(str(tmp_path), "tsm", lock) == [str(tmp_path / left)]
