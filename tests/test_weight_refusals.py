"""Issue 15, weights and tools: broken files, bad numbers and outputs that would overwrite an
input are refused by every loader and tool with one line naming the key and file (exit 2)."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import save_file

import networks.tsm_lora as tsm_lora
from tests.tiny_models import tiny_sd_pipeline_folder
from tests.tool_scripts import tool_main as _tool
from tests.tool_scripts import tool_path
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.base_models.loading import load_components
from tsm_trainer.core.file_format import TSMFileError, load_file, save_file_atomic

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_sd_pipeline_folder(str(tmp_path_factory.mktemp("base")))
    _, unet, encoders = load_components(base, weights=True)
    net = TSMNetwork(TSMConfig(scales=[4], rank=2, alpha=1.0), unet, [encoders[0][1]])
    with torch.no_grad():
        for p in net.parameters():
            if p.dim():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("tsm")
    path = str(folder / "tsm4.safetensors")
    net.save(path, metadata={"ss_network_alpha": "1.0", "ss_network_dim": "2"})
    tensors, meta = load_file(path)

    def variant(name, change=None, meta_change=None):
        t = {k: v.clone() for k, v in tensors.items()}
        if change:
            change(t)
        out = str(folder / f"{name}.safetensors")
        save_file(t, out, {**meta, **(meta_change or {})})
        return out

    def set_(key, value):
        return lambda t: t.__setitem__(key, value)

    down = f"{KEY}.tsm.4.1.lora_down.weight"
    bad = {
        "nan": (variant("nan", lambda t: t[down].__setitem__((0, 0), float("nan"))), down, "NaN or Inf"),
        "inf_alpha": (
            variant("inf_alpha", set_(f"{KEY}.alpha", torch.tensor(float("inf")))),
            f"{KEY}.alpha",
            "NaN or Inf",
        ),
        "int8": (variant("int8", set_(down, tensors[down].to(torch.int8))), down, "dtype int8"),
        "rank": (
            variant("rank", set_(down, torch.zeros(3, tensors[down].shape[1]))),
            f"{KEY}.tsm.4.1.lora_up.weight",
            "does not match the rank",
        ),
        "empty": (variant("empty", lambda t: t.clear()), None, "holds no tensors"),
    }
    return base, path, bad, variant


CASES = ["nan", "inf_alpha", "int8", "rank", "empty"]


@pytest.mark.parametrize("case", CASES)
def test_loaders_refuse_broken_weights(setup, case):
    base, _, bad, _ = setup
    path, key, what = bad[case]
    _, unet, encoders = load_components(base, weights=True)
    text_encoders = [encoders[0][1]]
    with pytest.raises(TSMFileError, match=what) as e:
        tsm_lora.create_network_from_weights(1.0, path, None, text_encoders, unet)
    assert path in str(e.value) and (key is None or key in str(e.value))
    net = TSMNetwork(TSMConfig(scales=[4], rank=2, alpha=1.0), unet, text_encoders)
    with pytest.raises(TSMFileError, match=what):
        net.load_weights(path)


@pytest.mark.parametrize("case", CASES)
def test_tools_refuse_broken_weights(setup, case, tmp_path, capsys):
    base, _, bad, _ = setup
    path, key, what = bad[case]
    runs = {
        "export_experts": [path, "--out_dir", str(tmp_path / "x")],
        "merge_experts": [path, "--scale", "4", "--out", str(tmp_path / "m.safetensors")],
        "bake": ["--base", base, "--lora", path, "--expert", "1", "--out", str(tmp_path / "b")],
    }
    for tool, argv in runs.items():
        assert _tool(tool)(argv) == 2, tool
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and path in err and what in err, (tool, err)
        assert key is None or key in err
    assert not os.path.exists(tmp_path / "x") or not os.listdir(tmp_path / "x")


def test_convert_refuses_a_broken_plain_lora(setup, tmp_path, capsys):
    base, path, _, _ = setup
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path)]) == 0
    expert = str(tmp_path / "tsm4_e0of4.safetensors")
    tensors, meta = load_file(expert)
    tensors[f"{KEY}.lora_up.weight"][0, 0] = float("inf")
    broken = str(tmp_path / "broken.safetensors")
    save_file(tensors, broken, meta)
    assert _tool("convert")([broken, "--to", "peft", "--base", base, "--out", str(tmp_path / "p.safetensors")]) == 2
    assert f"{broken}: key '{KEY}.lora_up.weight' holds NaN or Inf" in capsys.readouterr().err


def test_bad_numbers_and_missing_scales_are_one_line_errors(setup, tmp_path, capsys):
    base, path, _, _ = setup
    out = str(tmp_path / "m.safetensors")
    cases = [
        ("merge_experts", [path, "--scale", "4", "--weights", "nan,1,1,1", "--out", out], "must be finite numbers"),
        ("merge_experts", [path, "--scale", "4", "--rank", "0", "--out", out], "--rank 0: must be >= 1"),
        ("merge_experts", [path, "--scale", "3", "--out", out], "no experts of scale 3 (--scale); it holds scales [4]"),
        ("merge_experts", [path, "--scale", "4", "--experts", "0,9", "--out", out], "expert 9 of scale 4 is not in"),
        (
            "bake",
            ["--base", base, "--lora", path, "--expert", "1", "--multiplier", "nan", "--out", str(tmp_path / "b")],
            "--multiplier nan: must be a finite number",
        ),
    ]
    for tool, argv, message in cases:
        assert _tool(tool)(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert not os.path.exists(out)


def test_missing_alpha_is_named_not_a_key_error_repr(setup, capsys, tmp_path):
    _, _, _, variant = setup
    path = variant("noalpha", lambda t: t.pop(f"{KEY}.alpha"))
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: key '{KEY}.alpha' is missing (every module of a TSM file has one alpha)\n"
    )


def test_outputs_never_overwrite_an_input(setup, tmp_path, capsys):
    base, path, _, _ = setup
    before = open(path, "rb").read()
    assert _tool("merge_experts")([path, "--scale", "4", "--out", path]) == 2
    assert f"--out {path} is the input file" in capsys.readouterr().err
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert _tool("merge_experts")([path, "--scale", "4", "--out", str(link)]) == 2
    capsys.readouterr()
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "tsm4_e2of4.safetensors").symlink_to(path)  # an export that resolves to the input
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path / "ex")]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "ex")) == ["tsm4_e2of4.safetensors"]  # nothing written before the check
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path / "plain"), "--scale", "4"]) == 0
    expert = str(tmp_path / "plain" / "tsm4_e0of4.safetensors")
    expert_bytes = open(expert, "rb").read()
    assert _tool("convert")([expert, "--to", "peft", "--base", base, "--out", expert]) == 2
    assert _tool("bake")(["--base", base, "--lora", path, "--expert", "0", "--out", path]) == 2
    assert open(path, "rb").read() == before and open(expert, "rb").read() == expert_bytes


def test_inspect_check_refuses_zero_timesteps_and_forged_scales(setup, tmp_path, capsys):
    base, _, _, variant = setup
    for name, meta, message in (
        ("t0", {"tsm.num_train_timesteps": "0"}, "tsm.num_train_timesteps=0 must be >= 1"),
        ("huge", {"tsm.scales": "[1000000]"}, "every scale must be in 1.."),
    ):
        path = variant(name, meta_change=meta)
        assert _tool("inspect_lora")([path, "--check", "--base", base]) == 1
        assert message in capsys.readouterr().out


def test_unreadable_file_says_permission_denied(setup):
    _, path, _, _ = setup
    folder = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        locked = os.path.join(folder, "locked.safetensors")
        with open(path, "rb") as src, open(locked, "wb") as dst:
            dst.write(src.read())
        os.chmod(locked, 0)
        root = os.geteuid() == 0
        if root:
            os.seteuid(65534)  # root reads anything: be another user for the read
        try:
            with pytest.raises(TSMFileError, match=f"{locked}: permission denied"):
                load_file(locked)
        finally:
            if root:
                os.seteuid(0)
    finally:
        os.chmod(locked, 0o600)
        os.unlink(locked)
        os.rmdir(folder)


def test_debug_shows_the_traceback(setup, tmp_path):
    _, path, _, _ = setup
    argv = [sys.executable, tool_path("merge_experts"), path, "--scale", "3", "--out", str(tmp_path / "m.safetensors")]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and plain.stderr.startswith("error: ")
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_atomic_writes_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_file_atomic({"a": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
