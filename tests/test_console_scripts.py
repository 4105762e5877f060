"""The [project.scripts] of pyproject.toml: each resolves to an importable main whose --help exits 0,
each command refuses Python 3.10 with one line, and --config_file is read through tomllib."""

import importlib
import os
import sys
import tomllib

import pytest

from tests.tool_scripts import ROOT

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    SCRIPTS = tomllib.load(_f)["project"]["scripts"]


def _entry(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def test_every_tool_is_a_console_script():
    """The commands of the README, train and the tools (the demo scripts stay in tools/: demo_world/ is not
    installed)."""
    assert set(SCRIPTS) == {
        "tsm-train",
        "tsm-export",
        "tsm-merge",
        "tsm-bake",
        "tsm-inspect",
        "tsm-convert",
        "tsm-evaluate",
    }
    shims = {f"tools/{n}" for n in os.listdir(os.path.join(ROOT, "tools"))} - {
        "tools/demo.py",
        "tools/demo_sd_scripts.py",
        "tools/make_demo_assets.py",
        "tools/__pycache__",
    }
    modules = {target.split(":")[0] for target in SCRIPTS.values()}
    for shim in shims:  # each tools/ script runs one of the installed commands' main
        with open(os.path.join(ROOT, shim)) as f:
            text = f.read()
        assert any(f"from {m} import main" in text for m in modules), shim


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_console_script_resolves_and_help_exits_0(command, capsys):
    main = _entry(SCRIPTS[command])
    assert callable(main)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_python_3_10_gets_one_line_and_exit_2(command, monkeypatch, capsys):
    main = _entry(SCRIPTS[command])
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tsm-trainer needs Python 3.11 or newer (this is 3.10.14): ")
    assert err.count("\n") == 1


def test_train_tsm_py_checks_the_version_before_importing_the_trainer(monkeypatch, capsys):
    """On 3.10 ``import tomllib`` fails; the check must come first (train_tsm.py, tsm-train)."""
    for name in [m for m in sys.modules if m == "tsm_trainer.training" or m.startswith("tsm_trainer.training.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib -> ImportError, as on 3.10
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setattr(sys, "argv", ["train_tsm.py", "--config_file", "x.toml"])
    train_tsm = importlib.import_module("train_tsm")
    with pytest.raises(SystemExit) as e:
        train_tsm.main()
    assert e.value.code == 2
    assert "needs Python 3.11 or newer" in capsys.readouterr().err


def test_config_file_is_read_in_binary_mode_through_tomllib(tmp_path, monkeypatch):
    """The 3.10 fallback ``toml.load`` of an "rb" file crashed every --config_file; tomllib needs "rb"."""
    from tsm_trainer.training import config as config_module

    modes = []
    real_load = tomllib.load

    def recording_load(f):
        modes.append(f.mode)
        return real_load(f)

    monkeypatch.setattr(config_module.tomllib, "load", recording_load)
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\npretrained_model_name_or_path = "./sd15"\n\n[training]\nmax_train_steps = 7\n'
        'output_name = "tsm8-é"\n',
        encoding="utf-8",
    )
    config = config_module.load_config(["--config_file", str(path), "--dataset_config", "d.toml"])
    assert modes == ["rb"]
    assert (config.pretrained_model_name_or_path, config.max_train_steps, config.output_name) == ("./sd15", 7, "tsm8-é")


def test_attribute_score_without_the_demo_world_says_so_before_loading(monkeypatch, capsys):
    """demo_world/ is not in the wheel: an installed tsm-evaluate --attribute_score names it, at once."""
    from tsm_trainer.cli import evaluate

    real_find_spec = evaluate.importlib.util.find_spec
    monkeypatch.setattr(
        evaluate.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "demo_world" else real_find_spec(name, *a),
    )
    with pytest.raises(SystemExit) as e:
        evaluate.main(
            ["--pretrained_model", "missing", "--dataset_config", "missing.toml", "--attribute_score", "heldout"]
        )
    assert e.value.code == 2
    assert "--attribute_score: needs the demo world (demo_world/ of a tsm-trainer clone" in capsys.readouterr().err
