"""Baking a LoRA (one TSM expert) into a base model, and un-baking it: diffusers folders and
original-layout single-file checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_models import tiny_clip, tiny_unet
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.cli import bake as bake_cli
from tsm_trainer.core.file_format import TSMFileError, load_file
from tsm_trainer.core.key_names import diffusers_unet_to_sgm
from tsm_trainer.core.targets import layers_by_lora_name
from tsm_trainer.files.bake import (
    BakeError,
    bake_diffusers_folder,
    bake_into_models,
    bake_single_file,
    expert_lora,
    load_lora_for_bake,
    lora_deltas,
    stored_dtypes,
    unbake_from_models,
)

EXPERT, SCALE = 3, 8  # expert 3 of 8: t in [375, 500)


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


def _pipeline(tmp, dtype=torch.float32):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_clip(),
        tokenizer=_tokenizer(str(tmp / "tok")),
        unet=tiny_unet(),
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = str(tmp / f"base-{str(dtype)[6:]}")
    pipe.to(dtype).save_pretrained(folder)
    return folder


def _tsm_file(path, unet, te):
    """A fostered 8-expert file with random nonzero weights, kxk conv experts and alpha != rank."""
    net = TSMNetwork(TSMConfig(scales=[SCALE], rank=2, alpha=1.0, conv_rank=2, conv_alpha=3.0), unet, [te])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save(str(path))
    return net


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bake")
    folder = _pipeline(tmp)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    net = _tsm_file(tmp / "tsm8.safetensors", pipe.unet, pipe.text_encoder)
    return {"tmp": tmp, "folder": folder, "pipe": pipe, "net": net, "tsm": str(tmp / "tsm8.safetensors")}


def _unet_out(unet, t):
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(len(t), 4, 8, 8, generator=g), torch.randn(len(t), 5, 16, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(t), c).sample


def _te_out(te):
    ids = torch.tensor([[0, 5, 9, 12, 1, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith((".tmp", ".old"))]


def test_bake_expert_into_folder_matches_network_then_unbake(base):
    from diffusers import DiffusionPipeline

    pipe, net, tmp = base["pipe"], base["net"], base["tmp"]
    lora, _ = load_lora_for_bake(base["tsm"], expert=EXPERT)  # scale: the core (only) one
    out = str(tmp / "baked")
    old_umask = os.umask(0o022)
    try:
        baked_names = bake_diffusers_folder(base["folder"], lora, out)
    finally:
        os.umask(old_umask)
    assert os.stat(out).st_mode & 0o777 == 0o755  # readable by a UI running as another user
    assert len(baked_names) == len(net.all_loras)
    assert _leftovers(tmp) == []

    t = (380, 499, 420)  # all in expert 3's interval
    net.apply()
    net.attach(pipe.unet)
    try:
        expected_unet, expected_te = _unet_out(pipe.unet, t), _te_out(pipe.text_encoder)
    finally:
        net.remove()
    base_unet, base_te = _unet_out(pipe.unet, t), _te_out(pipe.text_encoder)

    baked = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    got_unet, got_te = _unet_out(baked.unet, t), _te_out(baked.text_encoder)
    assert (expected_unet - base_unet).abs().max() > 1e-3  # the expert does something
    torch.testing.assert_close(got_unet, expected_unet, rtol=0, atol=1e-5)
    assert (expected_te - base_te).abs().max() > 1e-3
    torch.testing.assert_close(got_te, expected_te, rtol=0, atol=1e-5)
    # the VAE is untouched
    for k, v in pipe.vae.state_dict().items():
        assert torch.equal(baked.vae.state_dict()[k], v), k

    unbake_from_models(lora, baked.unet, [baked.text_encoder])
    for model, ref in ((baked.unet, pipe.unet), (baked.text_encoder, pipe.text_encoder)):
        ref_state = ref.state_dict()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref_state[k], rtol=0, atol=1e-6, msg=k)


def test_bake_into_models_round_trip_and_delta_math(base):
    tensors, meta = load_file(base["tsm"])
    lora = expert_lora(tensors, meta, SCALE, 5)
    assert (
        not any(".tsm." in k for k in lora)
        and "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in lora
    )
    unet, te = tiny_unet(), tiny_clip()
    before = {
        **{"u." + k: v.clone() for k, v in unet.state_dict().items()},
        **{"t." + k: v.clone() for k, v in te.state_dict().items()},
    }
    layers = layers_by_lora_name(unet, [te])
    deltas = lora_deltas(lora, layers)
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # a 3x3 conv expert
    assert deltas[conv].shape == layers[conv].weight.shape and deltas[conv].dim() == 4
    bake_into_models(lora, unet, [te], multiplier=0.5)
    w = layers[conv].weight
    torch.testing.assert_close(
        w, before["u.down_blocks.1.resnets.0.conv1.weight"] + 0.5 * deltas[conv], rtol=0, atol=1e-6
    )
    unbake_from_models(lora, unet, [te], multiplier=0.5)
    after = {**{"u." + k: v for k, v in unet.state_dict().items()}, **{"t." + k: v for k, v in te.state_dict().items()}}
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6, msg=k)


def test_folder_overwrite_refused_then_swapped_and_dtype_kept(base):
    tmp = base["tmp"]
    folder16 = _pipeline(tmp, torch.float16)
    assert stored_dtypes(folder16)["unet"] == torch.float16
    lora, _ = load_lora_for_bake(base["tsm"], expert=0)
    out = str(tmp / "baked16")
    os.makedirs(out)
    with open(os.path.join(out, "old.txt"), "w") as f:
        f.write("old")
    with pytest.raises(BakeError, match="already exists"):
        bake_diffusers_folder(folder16, lora, out)
    assert os.listdir(out) == ["old.txt"]
    bake_diffusers_folder(folder16, lora, out, overwrite=True)
    assert "old.txt" not in os.listdir(out) and "model_index.json" in os.listdir(out)
    assert _leftovers(tmp) == []
    unet_file = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in load_file(unet_file)[0].values())
    with pytest.raises(BakeError, match="base model itself"):
        bake_diffusers_folder(folder16, lora, folder16, overwrite=True)


def _sd1_checkpoint(path, unet, te):
    """An original-layout SD1 checkpoint of the tiny models (SGM UNet names, CLIP under cond_stage_model)."""
    up_attn = frozenset(i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t)
    state = {}
    for key, value in unet.state_dict().items():
        sgm = diffusers_unet_to_sgm(
            key, layers_per_block=unet.config.layers_per_block, up_blocks_with_attention=up_attn
        )
        state[f"model.diffusion_model.{sgm}"] = value.clone()
    for key, value in te.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state[f"cond_stage_model.transformer.{key}"] = value.clone()
    state["first_stage_model.decoder.conv_out.weight"] = torch.randn(3, 4, 3, 3)
    save_file(state, str(path), {"format": "pt", "note": "tiny"})
    return up_attn


def test_sgm_names_of_parameter_paths():
    """A parameter path maps like its module path plus the parameter (downsampler conv -> op)."""
    for lpb, up_attn in ((2, frozenset({0, 1})), (1, frozenset({1, 2, 3}))):
        for module in (
            "down_blocks.0.downsamplers.0.conv",
            "down_blocks.1.resnets.0.conv1",
            "up_blocks.0.upsamplers.0.conv",
            "mid_block.resnets.1.norm2",
            "conv_in",
        ):
            sgm = diffusers_unet_to_sgm(module, lpb, up_attn)
            for param in ("weight", "bias"):
                assert diffusers_unet_to_sgm(f"{module}.{param}", lpb, up_attn) == f"{sgm}.{param}", (module, param)
    assert diffusers_unet_to_sgm("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert diffusers_unet_to_sgm("down_blocks.0.downsamplers.0.conv.weight") == "input_blocks.3.0.op.weight"
    assert diffusers_unet_to_sgm("down_blocks.1.downsamplers.0.conv.bias", 1) == "input_blocks.4.0.op.bias"


def test_bake_single_file_sd1(base, tmp_path):
    unet, te = tiny_unet(), tiny_clip()
    ckpt = tmp_path / "sd1.safetensors"
    up_attn = _sd1_checkpoint(ckpt, unet, te)
    lora, _ = load_lora_for_bake(base["tsm"], expert=EXPERT)
    out = str(tmp_path / "sd1-baked.safetensors")
    names = bake_single_file(str(ckpt), lora, out, multiplier=0.7, layers_per_block=1, up_blocks_with_attention=up_attn)
    assert _leftovers(tmp_path) == []
    src, meta_src = load_file(str(ckpt))
    dst, meta_dst = load_file(out)
    assert meta_dst == meta_src and set(dst) == set(src)

    deltas = lora_deltas(lora, layers_by_lora_name(unet, [te]))
    assert set(names) == set(deltas)
    expected = {k: v.clone() for k, v in src.items()}
    # the same change the in-memory bake makes, mapped to checkpoint keys by hand
    bake_into_models(lora, unet, [te], multiplier=0.7)
    changed = 0
    for key, value in unet.state_dict().items():
        sgm = diffusers_unet_to_sgm(key, layers_per_block=1, up_blocks_with_attention=up_attn)
        expected[f"model.diffusion_model.{sgm}"] = value
    for key, value in te.state_dict().items():
        expected[f"cond_stage_model.transformer.text_model.{key}"] = value
    for key in src:
        torch.testing.assert_close(dst[key], expected[key], rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(dst[key], src[key])
    assert changed == len(deltas)
    conv = "model.diffusion_model.input_blocks.3.0.in_layers.2.weight"  # down_blocks.1.resnets.0.conv1, 3x3
    torch.testing.assert_close(
        dst[conv] - src[conv], 0.7 * deltas["lora_unet_down_blocks_1_resnets_0_conv1"], rtol=0, atol=1e-6
    )

    with pytest.raises(BakeError, match="already exists"):
        bake_single_file(str(ckpt), lora, out, layers_per_block=1, up_blocks_with_attention=up_attn)
    # un-bake: bake the same LoRA with the negated multiplier into the baked file
    bake_single_file(
        out,
        lora,
        out.replace("baked", "unbaked"),
        multiplier=-0.7,
        layers_per_block=1,
        up_blocks_with_attention=up_attn,
    )
    back, _ = load_file(out.replace("baked", "unbaked"))
    for key in src:
        torch.testing.assert_close(back[key], src[key], rtol=0, atol=1e-6, msg=key)


def test_bake_single_file_sdxl_openclip_in_proj_thirds(tmp_path):
    te1, te2 = tiny_clip(seed=1), tiny_clip(seed=2, with_projection=True)
    state = {"model.diffusion_model.time_embed.0.weight": torch.randn(32, 8)}
    for key, value in te1.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state[f"conditioner.embedders.0.transformer.{key}"] = value.clone()
    te2_state = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in te2.state_dict().items()}
    root = "conditioner.embedders.1.model.transformer.resblocks"
    for i in range(2):
        p = f"encoder.layers.{i}."
        state[f"{root}.{i}.attn.in_proj_weight"] = torch.cat(
            [te2_state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        ).clone()
        state[f"{root}.{i}.attn.out_proj.weight"] = te2_state[p + "self_attn.out_proj.weight"].clone()
        state[f"{root}.{i}.mlp.c_fc.weight"] = te2_state[p + "mlp.fc1.weight"].clone()
        state[f"{root}.{i}.mlp.c_proj.weight"] = te2_state[p + "mlp.fc2.weight"].clone()
    ckpt = str(tmp_path / "sdxl.safetensors")
    save_file(state, ckpt)

    g = torch.Generator().manual_seed(3)
    layers = layers_by_lora_name(None, [te1, te2])
    names = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] + [
        f"lora_te2_text_model_encoder_layers_1_{x}"
        for x in (
            "self_attn_q_proj",
            "self_attn_k_proj",
            "self_attn_v_proj",
            "self_attn_out_proj",
            "mlp_fc1",
            "mlp_fc2",
        )
    ]
    lora = {}
    for name in names:
        d, k = layers[name].weight.shape
        lora[f"{name}.lora_down.weight"] = torch.randn(2, k, generator=g)
        lora[f"{name}.lora_up.weight"] = torch.randn(d, 2, generator=g)
        lora[f"{name}.alpha"] = torch.tensor(1.0)
    lora["lora_unet_time_embed_0.lora_down.weight"] = torch.randn(2, 8, generator=g)  # SGM name, as SDXL files
    lora["lora_unet_time_embed_0.lora_up.weight"] = torch.randn(32, 2, generator=g)

    out = str(tmp_path / "sdxl-baked.safetensors")
    bake_single_file(ckpt, lora, out)
    dst, _ = load_file(out)
    deltas = lora_deltas({k: v for k, v in lora.items() if k.startswith("lora_te")}, layers)
    for name in names:
        te_delta = deltas[name]
        if name.startswith("lora_te1"):
            key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
            torch.testing.assert_close(dst[key] - state[key], te_delta, rtol=0, atol=1e-6)
            continue
        bake_into_models({k: v for k, v in lora.items() if k.startswith(name + ".")}, None, [te1, te2])
    te2_after = {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in te2.state_dict().items()}
    p = "encoder.layers.1."
    fused = torch.cat([te2_after[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    torch.testing.assert_close(dst[f"{root}.1.attn.in_proj_weight"], fused, rtol=0, atol=1e-6)
    torch.testing.assert_close(dst[f"{root}.1.mlp.c_proj.weight"], te2_after[p + "mlp.fc2.weight"], rtol=0, atol=1e-6)
    assert torch.equal(dst[f"{root}.0.attn.in_proj_weight"], state[f"{root}.0.attn.in_proj_weight"])
    assert not torch.equal(
        dst["model.diffusion_model.time_embed.0.weight"], state["model.diffusion_model.time_embed.0.weight"]
    )


def test_refusals_and_errors_name_key_and_file(base, tmp_path):
    lora, _ = load_lora_for_bake(base["tsm"], expert=EXPERT)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(TSMFileError, match="pickle"):
        bake_single_file(str(ckpt), lora, str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()

    unet, te = tiny_unet(), tiny_clip()
    layers = layers_by_lora_name(unet, [te])
    bad = dict(lora)
    bad["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(2, 8)
    bad["lora_unet_no_such_module.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(BakeError, match=r"my\.safetensors.*lora_unet_no_such_module\.lora_down\.weight"):
        lora_deltas(bad, layers, source="my.safetensors")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = dict(lora)
    bad[f"{key}.lora_down.weight"] = torch.zeros(2, 5)
    with pytest.raises(BakeError, match=rf"my\.safetensors.*{key}\.lora_down\.weight.*shape"):
        bake_into_models(bad, unet, [te], source="my.safetensors")
    tensors, _ = load_file(base["tsm"])
    with pytest.raises(BakeError, match="native TSM file"):
        lora_deltas(tensors, layers, source="tsm8.safetensors")
    with pytest.raises(TSMFileError, match="expert 9 of scale 8 is not in the file.*experts 0-7"):
        load_lora_for_bake(base["tsm"], expert=9)


def test_cli(base, tmp_path, capsys):
    cli = bake_cli
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--help"])
    assert e.value.code == 0 and "--expert" in capsys.readouterr().out
    out = str(tmp_path / "x.safetensors")
    ckpt = tmp_path / "sd1.safetensors"
    _sd1_checkpoint(ckpt, tiny_unet(), tiny_clip())
    assert cli.main(["--base", str(ckpt), "--lora", base["tsm"], "--out", out]) == 2
    err = capsys.readouterr().err
    assert "scale 8: experts 0-7" in err and "--expert" in err and "merge" in err
    assert not os.path.exists(out)
    # the tiny UNet is not SD1's layout (1 layer per block): names don't map, and the error says which
    assert cli.main(["--base", str(ckpt), "--lora", base["tsm"], "--expert", "3", "--out", out]) == 2
    assert "have no weight in" in capsys.readouterr().err
    out_folder = str(tmp_path / "cli-baked")
    assert (
        cli.main(
            [
                "--base",
                base["folder"],
                "--lora",
                base["tsm"],
                "--expert",
                "3",
                "--scale",
                "8",
                "--multiplier",
                "-1",
                "--out",
                out_folder,
            ]
        )
        == 0
    )
    assert "baked" in capsys.readouterr().out and os.path.isfile(os.path.join(out_folder, "model_index.json"))
    assert cli.main(["--base", base["folder"], "--lora", base["tsm"], "--expert", "3", "--out", out_folder]) == 2
    assert "already exists" in capsys.readouterr().err
