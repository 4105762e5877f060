"""tools/inspect_lora.py and tsm_trainer.files.inspection: summaries of TSM / kohya / PEFT files, --check."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import networks.tsm_lora as tsm_lora
from tests.tiny_models import tiny_clip, tiny_unet
from tests.tool_scripts import tool_module, tool_path
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.base_models.loading import BaseModelError, load_base_model
from tsm_trainer.core.file_format import TSMFileError, load_file
from tsm_trainer.core.metadata import kohya_metadata, modelspec_metadata
from tsm_trainer.families import get_family
from tsm_trainer.files.inspection import check_against_model, format_summary, summarize

SCRIPT = tool_path("inspect_lora")
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def _save_base(folder, unet, te):
    unet.save_pretrained(os.path.join(folder, "unet"))
    te.save_pretrained(os.path.join(folder, "text_encoder"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": [None, None],
            },
            f,
        )
    return str(folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "sd1": _save_base(root / "sd1", tiny_unet(), tiny_clip()),
        "other": _save_base(root / "other", tiny_unet(cross_attention_dim=24), tiny_clip()),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A fostered n=8 file, fostered n=1, and the assembled [8, 1] file (with text encoder)."""
    root = tmp_path_factory.mktemp("files")
    unet, te = tiny_unet(), tiny_clip()
    family = get_family("sd1")
    out = {}
    net8 = _randomize(TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0), unet, [te]))
    out["foster8"] = str(root / "foster8.safetensors")
    meta = {
        **kohya_metadata(family, "networks.tsm_lora", 2, 1.0, {"tsm_scales": "8"}, "foster8"),
        **modelspec_metadata(family, "foster8"),
    }
    net8.save(out["foster8"], metadata=meta)
    out["counts"] = (len(net8.denoiser_loras), len(net8.text_encoder_loras))
    net1 = _randomize(TSMNetwork(TSMConfig(scales=[1], rank=2, alpha=1.0), unet, [te]), seed=1)
    out["foster1"] = str(root / "foster1.safetensors")
    net1.save(out["foster1"], metadata=meta)
    assembled = tsm_lora.create_network(
        1.0,
        2,
        1.0,
        None,
        te,
        unet,
        tsm_scales="8,1",
        tsm_stage="assemble",
        tsm_experts=f"{out['foster8']},{out['foster1']}",
    )
    out["assembled"] = str(root / "assembled.safetensors")
    assembled.save_weights(out["assembled"], None, {"ss_output_name": "assembled"})
    return out


def test_summary_of_fostered_file(files):
    s = summarize(files["foster8"])
    n_unet, n_te = files["counts"]
    assert s["kind"] == "tsm"
    assert s["family"] == {"name": "sd1", "source": "modelspec.architecture=stable-diffusion-v1/lora"}
    assert s["modules"] == {"lora_te": n_te, "lora_unet": n_unet} and s["num_modules"] == n_unet + n_te
    assert s["ranks"] == {2: n_unet + n_te} and s["alphas"] == {1: n_unet + n_te}
    t = s["tsm"]
    assert t["scales"] == [8] and t["stage"] == "foster" and t["num_train_timesteps"] == 1000
    assert t["timestep_space"] == "ddpm" and t["router"] is False and t["interval"] is None
    (scale,) = t["experts"]
    assert scale["scale"] == 8 and scale["count"] == 8
    assert scale["experts"][0] == {"index": 0, "interval": [0, 125]}
    assert scale["experts"][7] == {"index": 7, "interval": [875, 1000]}
    assert s["hashes"]["model_hash_match"] is True and s["hashes"]["legacy_hash_match"] is True
    assert s["metadata"]["ss"]["ss_network_module"] == "networks.tsm_lora"
    assert s["metadata"]["tsm"]["tsm.scales"] == "[8]"
    assert s["dtypes"] == {"float32": s["num_tensors"]} and s["problems"] == [] and s["non_finite"] == []
    tensors, _ = load_file(files["foster8"])
    assert s["num_parameters"] == sum(v.numel() for v in tensors.values())
    text = format_summary(s)
    for needle in (
        "native TSM file",
        "family:      sd1",
        "scale 8: 8 experts",
        "0:[0,125)",
        "7:[875,1000)",
        "matches the tensor data",
        "problems:    none",
        f"lora_unet {n_unet}",
    ):
        assert needle in text, needle
    json.dumps(s)  # serialisable


def test_summary_of_assembled_file(files):
    s = summarize(files["assembled"])
    t = s["tsm"]
    assert t["scales"] == [8, 1] and t["stage"] == "assemble" and t["mixture"] == "asymmetric"
    assert t["router"] is True and t["router_modules"] == files["counts"][0]
    assert [(x["scale"], x["count"]) for x in t["experts"]] == [(8, 8), (1, 1)]
    assert t["experts"][1]["experts"] == [{"index": 0, "interval": [0, 1000]}]
    assert s["family"]["name"] == "sd1" and s["problems"] == []
    assert "router yes" in format_summary(s)


def test_hash_mismatch_after_tampering(files, tmp_path, bases):
    tensors, meta = load_file(files["foster8"])
    wrong_hash = str(tmp_path / "wrong_hash.safetensors")
    save_file(tensors, wrong_hash, {**meta, "sshs_model_hash": "0" * 64})
    s = summarize(wrong_hash)
    assert s["hashes"]["model_hash_match"] is False
    assert "DOES NOT MATCH" in format_summary(s)

    changed = dict(tensors)
    key = next(k for k in tensors if k.endswith("tsm.8.3.lora_up.weight"))
    changed[key] = tensors[key] + 1
    edited = str(tmp_path / "edited.safetensors")
    save_file(changed, edited, meta)  # the stored hash is the old one
    assert summarize(edited)["hashes"]["model_hash_match"] is False
    reasons = check_against_model(edited, *load_base_model(bases["sd1"]))
    assert len(reasons) == 1 and "edited.safetensors" in reasons[0] and "sshs_model_hash" in reasons[0]

    no_hash = str(tmp_path / "no_hash.safetensors")
    save_file(tensors, no_hash, {k: v for k, v in meta.items() if not k.startswith("sshs_")})
    assert summarize(no_hash)["hashes"]["model_hash_match"] is None


def _kohya_tensors(rank=4):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        f"{Q}.lora_down.weight": r(rank, 8),
        f"{Q}.lora_up.weight": r(8, rank),
        f"{Q}.alpha": torch.tensor(2.0),
        f"{CONV}.lora_down.weight": r(rank, 8, 3, 3),
        f"{CONV}.lora_up.weight": r(8, rank, 1, 1),
        f"{CONV}.alpha": torch.tensor(2.0),
        f"{TE_Q}.lora_down.weight": r(rank, 16),
        f"{TE_Q}.lora_up.weight": r(16, rank),
        f"{TE_Q}.alpha": torch.tensor(1.0),
    }


def test_kohya_lora_summary_and_check(tmp_path, bases):
    path = str(tmp_path / "kohya.safetensors")
    save_file(_kohya_tensors(), path)
    s = summarize(path)
    assert s["kind"] == "kohya" and s["modules"] == {"lora_te": 1, "lora_unet": 2}
    assert s["ranks"] == {4: 3} and s["alphas"] == {1: 1, 2: 2}
    assert s["family"]["name"] == "sd1 or sd2" and "tsm" not in s and s["hashes"]["model_hash_match"] is None
    base = load_base_model(bases["sd1"])
    assert check_against_model(path, *base) == []

    bad = _kohya_tensors()
    bad[f"{Q}.lora_down.weight"] = torch.zeros(4, 12)
    bad[f"{CONV}.lora_up.weight"] = torch.full((8, 4, 1, 1), float("nan"))
    bad["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    bad["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    bad_path = str(tmp_path / "bad.safetensors")
    save_file(bad, bad_path)
    reasons = check_against_model(bad_path, *base)
    assert all(r.startswith(bad_path) for r in reasons)
    text = "\n".join(reasons)
    assert f"key '{Q}.lora_down.weight' has shape (4, 12), the layer Linear(8, 8) needs (4, 8)" in text
    assert f"key '{CONV}.lora_up.weight' holds non-finite values" in text
    assert "key 'lora_unet_no_such_layer.lora_down.weight': this model has no layer" in text
    assert len(reasons) == 3

    # against a base without text encoder: the te module can't be checked, and says so
    reasons = check_against_model(path, base[0], [])
    assert len(reasons) == 1 and "cannot be checked" in reasons[0] and TE_Q in reasons[0]


def test_exported_expert_metadata(tmp_path):
    tensors = {k: v for k, v in _kohya_tensors().items() if k.startswith(Q)}
    path = str(tmp_path / "expert3.safetensors")
    save_file(
        tensors,
        path,
        {
            "modelspec.timestep_range": "375,500",
            "tsm.expert": "3/8",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        },
    )
    s = summarize(path)
    assert s["kind"] == "kohya" and s["family"]["name"] == "sdxl"
    assert s["expert"] == {"timestep_range": [375, 500], "index": 3, "scale": 8, "expected_range": [375, 500]}
    assert s["problems"] == [] and "expert 3 of 8, timesteps [375,500)" in format_summary(s)
    save_file(tensors, path, {"modelspec.timestep_range": "376,500", "tsm.expert": "3/8"})
    assert "is not the interval of expert 3/8 (375,500)" in summarize(path)["problems"][0]


def test_peft_lora(tmp_path, bases):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {
        f"unet.{q}.lora_A.weight": torch.randn(4, 8),
        f"unet.{q}.lora_B.weight": torch.randn(8, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4),
    }
    path = str(tmp_path / "peft.safetensors")
    save_file(tensors, path)
    s = summarize(path)
    assert s["kind"] == "peft" and s["modules"] == {"text_encoder": 1, "unet": 1} and s["ranks"] == {4: 2}
    assert check_against_model(path, *load_base_model(bases["sd1"])) == []
    reasons = check_against_model(path, *load_base_model(bases["other"]))
    assert reasons == []  # to_q (self-attention) has the same shape in both bases
    tensors[f"unet.{q.replace('attn1.to_q', 'attn2.to_k')}.lora_A.weight"] = torch.randn(4, 16)
    tensors[f"unet.{q.replace('attn1.to_q', 'attn2.to_k')}.lora_B.weight"] = torch.randn(8, 4)
    save_file(tensors, path)
    (reason,) = check_against_model(path, *load_base_model(bases["other"]))
    assert "attn2.to_k.lora_A.weight' has shape (4, 16)" in reason

    flux = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
    }
    save_file(flux, path)
    assert summarize(path)["family"]["name"] == "flux"


def test_family_from_key_names(tmp_path):
    cases = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "sdxl",
        "lora_unet_joint_blocks_0_x_block_attn_qkv": "sd3",
        "lora_unet_double_blocks_0_img_attn_qkv": "flux",
        "lora_transformer_transformer_blocks_0_attn_to_q": "sd3 or flux",
    }
    for name, family in cases.items():
        path = str(tmp_path / "f.safetensors")
        save_file({f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2)}, path)
        assert summarize(path)["family"]["name"] == family, name


def test_tsm_check_passes_on_right_base_fails_on_other(files, bases):
    right = load_base_model(bases["sd1"])
    assert type(right[0]).__name__ == "UNet2DConditionModel" and len(right[1]) == 1
    assert check_against_model(files["foster8"], *right) == []
    assert check_against_model(files["assembled"], *right) == []
    (reason,) = check_against_model(files["foster8"], *load_base_model(bases["other"]))
    assert reason.startswith(files["foster8"] + ": does not fit this model") and "attn2_to_k" in reason


def test_load_base_model_errors_and_unet_only(tmp_path):
    with pytest.raises(BaseModelError, match="nowhere: not a folder"):
        load_base_model(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BaseModelError, match="empty: no unet or transformer found"):
        load_base_model(str(empty))
    tiny_unet().save_pretrained(str(tmp_path / "unet_only" / "unet"))
    denoiser, encoders = load_base_model(str(tmp_path / "unet_only"))
    assert type(denoiser).__name__ == "UNet2DConditionModel" and encoders == []
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    (tmp_path / "broken" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(BaseModelError, match="broken.unet: cannot load UNet2DConditionModel"):
        load_base_model(str(tmp_path / "broken"), weights=True)  # a config without weights


def test_cli_in_process(files, bases, tmp_path, capsys):
    cli = tool_module("inspect_lora")
    assert cli.main([files["foster8"], files["assembled"]]) == 0
    out = capsys.readouterr().out
    assert out.count("native TSM file") == 2 and "scale 1: 1 expert  0:[0,1000)" in out
    assert cli.main([files["foster8"], "--json"]) == 0
    (data,) = json.loads(capsys.readouterr().out)
    assert data["tsm"]["experts"][0]["experts"][0]["interval"] == [0, 125]
    assert cli.main([files["foster8"], files["assembled"], "--check", "--base", bases["sd1"]]) == 0
    assert capsys.readouterr().out.count(f"check:       fits {bases['sd1']}") == 2
    assert cli.main([files["foster8"], "--check", "--base", str(tmp_path / "missing")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([files["foster8"], "--check"])
    assert e.value.code == 2


def test_cli_subprocess_check_fails_and_truncated_file(files, bases, tmp_path):
    truncated = str(tmp_path / "truncated.safetensors")
    with open(files["foster8"], "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])

    def run(*args):
        return subprocess.run(
            [sys.executable, SCRIPT, *args],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            timeout=120,
        )

    p = run(files["foster8"], "--check", "--base", bases["other"])
    assert p.returncode == 1, p.stderr
    assert "DOES NOT FIT" in p.stdout and "attn2_to_k" in p.stdout and files["foster8"] in p.stdout
    p = run(truncated, files["foster8"])
    assert p.returncode == 2
    assert "truncated.safetensors: not a readable safetensors file" in p.stderr
    assert "scale 8: 8 experts" in p.stdout  # the readable file is still summarised
    p = run("--help")
    assert p.returncode == 0 and "example" in p.stdout and "--check" in p.stdout


def test_unreadable_inputs_raise(tmp_path):
    with pytest.raises(TSMFileError, match="no such file"):
        summarize(str(tmp_path / "none.safetensors"))
    torch.save({"a": torch.zeros(1)}, str(tmp_path / "x.pt"))
    with pytest.raises(TSMFileError, match="only .safetensors"):
        summarize(str(tmp_path / "x.pt"))
