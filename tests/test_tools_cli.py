"""The command-line tools over tsm_trainer.files.export, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_models import tiny_sd_pipeline_folder
from tests.tool_scripts import tool_main as _tool
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.base_models.loading import load_components
from tsm_trainer.core.file_format import load_file
from tsm_trainer.core.lora_math import lora_delta, module_names
from tsm_trainer.files.export import expert_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_sd_pipeline_folder(str(tmp_path_factory.mktemp("base")))
    _, unet, encoders = load_components(base, weights=True)
    net = TSMNetwork(TSMConfig(scales=[4], rank=2, alpha=1.0), unet, [encoders[0][1]])
    with torch.no_grad():
        for p in net.parameters():
            if p.dim():
                p.normal_(0, 0.3)
    path = str(tmp_path_factory.mktemp("tsm") / "tsm4.safetensors")
    net.save(path)
    return base, path


@pytest.mark.parametrize("tool", ["export_experts", "merge_experts", "convert", "evaluate"])
def test_help_has_an_example(tool):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"), "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Example:" in out and f"tools/{tool}.py" in out


def test_export_merge_convert(setup, tmp_path, capsys):
    base, path = setup
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path / "x")]) == 0
    assert sorted(os.listdir(tmp_path / "x")) == [f"tsm4_e{e}of4.safetensors" for e in range(4)] + [
        "tsm4_te.safetensors"
    ]
    assert "expert 3/4  t in [750, 1000)" in capsys.readouterr().out
    workflow = str(tmp_path / "wf.json")
    assert (
        _tool("export_experts")(
            [path, "--out_dir", str(tmp_path / "x"), "--comfyui-workflow", workflow, "--checkpoint", "sd15.safetensors"]
        )
        == 0
    )
    with open(workflow) as f:
        nodes = json.load(f)["nodes"]
    hooked = sorted(n["widgets_values"][0] for n in nodes if n["type"] == "CreateHookLoraModelOnly")
    assert hooked == [f"tsm4_e{e}of4.safetensors" for e in range(4)]
    assert any(n["type"] == "CheckpointLoaderSimple" and n["widgets_values"][0] == "sd15.safetensors" for n in nodes)

    assert (
        _tool("merge_experts")(
            [path, "--scale", "4", "--weights", "interval", "--out", str(tmp_path / "m.safetensors")]
        )
        == 0
    )
    merged, meta = load_file(str(tmp_path / "m.safetensors"))
    tensors, _ = load_file(path)
    name = next(n for n in module_names(merged) if n.startswith("lora_unet"))
    expected = sum(0.25 * lora_delta(expert_lora(tensors, 4, e), name) for e in range(4))
    torch.testing.assert_close(lora_delta(merged, name), expected, rtol=1e-5, atol=1e-6)
    assert "scale 4 experts [0, 1, 2, 3]" in meta["tsm.merged_from"]

    assert _tool("merge_experts")([path, "--scale", "4", "--rank", "2", "--out", str(tmp_path / "r.safetensors")]) == 0
    assert "SVD rank 2: relative Frobenius error" in capsys.readouterr().out

    peft = str(tmp_path / "p.safetensors")
    assert (
        _tool("convert")(
            [str(tmp_path / "x" / "tsm4_e1of4.safetensors"), "--to", "peft", "--base", base, "--out", peft]
        )
        == 0
    )
    assert all(k.startswith("unet.") for k in load_file(peft)[0])
    back = str(tmp_path / "k.safetensors")
    assert _tool("convert")([peft, "--to", "kohya", "--base", base, "--out", back]) == 0
    original = expert_lora(tensors, 4, 1)
    for n in module_names(original):
        torch.testing.assert_close(lora_delta(load_file(back)[0], n), lora_delta(original, n))


def test_tools_report_bad_input(setup, tmp_path, capsys):
    base, path = setup
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path), "--scale", "8"]) == 2
    assert "no experts of scale 8" in capsys.readouterr().err
    assert (
        _tool("merge_experts")([path, "--scale", "4", "--weights", "1,2", "--out", str(tmp_path / "m.safetensors")])
        == 2
    )
    assert "2 weights given for 4 experts" in capsys.readouterr().err
    assert _tool("convert")([path, "--to", "peft", "--base", base, "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "native TSM file: export its experts first" in capsys.readouterr().err
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path / "x")]) == 0
    expert = str(tmp_path / "x" / "tsm4_e0of4.safetensors")
    assert (
        _tool("convert")([expert, "--to", "peft", "--base", str(tmp_path), "--out", str(tmp_path / "c.safetensors")])
        == 2
    )
    assert "not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().err


def test_merge_keeps_the_text_encoder_lora_apart_and_diffusers_loads_the_merge(setup, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from tsm_trainer.files.export import merge_experts, svd_truncate, text_encoder_lora

    base, path = setup
    tensors, _ = load_file(path)
    out = str(tmp_path / "r.safetensors")
    assert _tool("merge_experts")([path, "--scale", "4", "--rank", "2", "--out", out]) == 0
    printed = capsys.readouterr().out
    merged, meta = load_file(out)
    te, te_meta = load_file(str(tmp_path / "r_te.safetensors"))
    assert not any(k.startswith("lora_te") for k in merged)
    assert te.keys() == text_encoder_lora(tensors).keys()
    assert all(torch.equal(te[k], tensors[k]) for k in te)  # kept as it is, not re-factored
    _, error = svd_truncate(merge_experts(tensors, 4, [0.25] * 4), 2)  # the denoiser's merge only
    assert f"relative Frobenius error of the denoiser's merge {error:.4%}" in printed
    assert meta["ss_network_alpha"] == meta["ss_network_dim"] == "2" and meta["tsm.alpha_folded"] == "true"
    assert te_meta["ss_network_alpha"] == "1.0" and te_meta["tsm.alpha_folded"] == "false"

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    name = next(n for n in module_names(merged) if n.startswith("lora_unet_down_blocks_0") and n.endswith("to_q"))
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    before = layer.weight.detach().clone()
    pipe.load_lora_weights(out)  # raised on the q/v-only text-encoder LoRA when it was in the same file
    pipe.fuse_lora()
    torch.testing.assert_close(
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight - before,
        lora_delta(merged, name),
        rtol=1e-4,
        atol=1e-6,
    )


def test_folded_and_converted_files_say_so(setup, tmp_path):
    base, path = setup

    assert _tool("export_experts")([path, "--out_dir", str(tmp_path), "--fold_alpha"]) == 0
    _, meta = load_file(str(tmp_path / "tsm4_e0of4.safetensors"))
    assert meta["ss_network_alpha"] == "2" and meta["tsm.alpha_folded"] == "true"
    assert _tool("export_experts")([path, "--out_dir", str(tmp_path / "raw")]) == 0
    _, raw = load_file(str(tmp_path / "raw" / "tsm4_e0of4.safetensors"))
    assert raw["ss_network_alpha"] == "1.0" and raw["tsm.alpha_folded"] == "false"
    peft = str(tmp_path / "p.safetensors")
    assert (
        _tool("convert")(
            [str(tmp_path / "raw" / "tsm4_e0of4.safetensors"), "--to", "peft", "--base", base, "--out", peft]
        )
        == 0
    )
    _, peft_meta = load_file(peft)
    assert peft_meta["tsm.alpha_folded"] == "true" and peft_meta["ss_network_alpha"] == "2"
