"""Single-file SD 1.x / 2.x / SDXL checkpoints in the LDM / SGM key layouts: the loader rebuilds the
exact models that were saved, offline, and refuses what it cannot read with a message naming it."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.ldm_checkpoints import save_tiny_tokenizer, write_checkpoint
from tsm_trainer.base_models.loading import BaseModelError, load_components
from tsm_trainer.base_models.single_file import describe, find_bpe_file
from tsm_trainer.families import get_training_family

KOHYA_NAMES = (
    "openai_clip-vit-large-patch14",
    "stabilityai_stable-diffusion-2",
    "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub access would fail


def same_outputs(loaded, ref, kind: str) -> None:
    """UNet, VAE and text encoders of ``loaded`` (Components) compute what the saved modules computed."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    ctx = torch.randn(2, 77, loaded.denoiser.config.cross_attention_dim, generator=g)
    kw = {}
    if kind == "sdxl":
        kw = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6)}}
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    ids = torch.randint(0, 100, (1, 77), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, t, ctx, **kw).sample, ref["unet"](x, t, ctx, **kw).sample)
        torch.testing.assert_close(loaded.vae.encode(image).latent_dist.mean, ref["vae"].encode(image).latent_dist.mean)
        for got, want in zip(loaded.text_encoders, ref["text_encoders"], strict=True):
            a, b = got(ids, output_hidden_states=True), want(ids, output_hidden_states=True)
            assert type(got) is type(want) and len(a.hidden_states) == len(b.hidden_states)
            torch.testing.assert_close(a[0], b[0])


def test_sd1_rebuilds_the_saved_models_with_the_clip_tokenizer(tmp_path):
    path = str(tmp_path / "sd15.safetensors")
    ref = write_checkpoint(path, "sd1")
    family = get_training_family("sd1")
    c = family.load(path)
    assert family.prediction_type == "epsilon" and c.noise_scheduler.config.prediction_type == "epsilon"
    assert c.noise_scheduler.config.beta_schedule == "scaled_linear" and c.vae.config.scaling_factor == 0.18215
    same_outputs(c, ref, "sd1")
    tok = c.tokenizers[0]
    assert find_bpe_file() is not None and len(tok) == 49408 and tok.model_max_length == 77
    # CLIP's published ids for this prompt: <start> a photo of a cat <end>
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token == "<|endoftext|>"
    # the cheap path (configs only, meta device) gives the same module tree for LoRA key names
    name, unet, encoders = load_components(path)
    assert name == "unet" and unet.device.type == "meta" and [n for n, _ in encoders] == ["text_encoder"]
    shapes = {k: v.shape for k, v in c.denoiser.state_dict().items()}
    assert {k: v.shape for k, v in unet.state_dict().items()} == shapes


def test_sd2_openclip_layout_and_v_prediction_sources(tmp_path, caplog):
    cache = save_tiny_tokenizer(tmp_path / "tokenizers", KOHYA_NAMES[1:2])
    path = str(tmp_path / "sd21.safetensors")
    ref = write_checkpoint(path, "sd2", vocab=100)
    model = describe(path)
    assert (model.family, model.prediction_type, model.prediction_source) == ("sd2", "epsilon", "default")
    family = get_training_family("sd2")
    c = family.load(path, tokenizer_cache_dir=cache)
    assert "training it as epsilon" in caplog.text and "--v_parameterization" in caplog.text  # said, not silent
    same_outputs(c, ref, "sd2")  # 2 of the file's 3 OpenCLIP layers: SD 2 conditions on the penultimate one
    assert c.text_encoders[0].config.num_hidden_layers == 2 and not c.denoiser.config.upcast_attention
    assert len(c.tokenizers[0]) == 74  # the tiny tokenizer from the kohya-layout cache folder

    # what records v-prediction: the caller (kohya's --v_parameterization), sd-scripts' modelspec
    # metadata, an A1111 .yaml next to the file
    family = get_training_family("sd2", "v_prediction")
    c = family.load(path, tokenizer_cache_dir=cache)
    assert family.prediction_type == "v_prediction" == c.noise_scheduler.config.prediction_type
    assert c.denoiser.config.upcast_attention
    spec = str(tmp_path / "spec.safetensors")
    write_checkpoint(spec, "sd2", vocab=100, metadata={"modelspec.prediction_type": "v"})
    assert describe(spec).prediction_type == "v_prediction"
    (tmp_path / "sd21.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert (describe(path).prediction_type, describe(path).prediction_source) == (
        "v_prediction",
        str(tmp_path / "sd21.yaml"),
    )
    assert describe(path, "epsilon").prediction_type == "epsilon"  # given explicitly: wins


def test_sd2_full_size_files_recording_nothing_get_a1111s_test_run(tmp_path, monkeypatch, caplog):
    """A1111 runs the UNet once (t = 999, inputs 0.5) and calls it v-prediction when output - input
    averages below -1; here the output is steered through the last convolution's bias."""
    from safetensors.torch import load_file

    from tsm_trainer.base_models.single_file import loader

    cache = save_tiny_tokenizer(tmp_path / "tokenizers", KOHYA_NAMES[1:2])
    path = str(tmp_path / "sd2.safetensors")
    write_checkpoint(path, "sd2", vocab=100)
    state = load_file(path)
    monkeypatch.setattr(loader, "FULL_SIZE_SD2", ([32, 64], 64))  # the probe is for full-size UNets only
    for bias, expected in ((-5.0, "v_prediction"), (5.0, "epsilon")):
        state["model.diffusion_model.out.2.bias"] = torch.full((4,), bias)
        save_file(state, path)
        family = get_training_family("sd2")
        c = family.load(path, tokenizer_cache_dir=cache)
        assert family.prediction_type == expected == c.noise_scheduler.config.prediction_type
        assert loader.a1111_v_prediction_test(c.denoiser) == (expected == "v_prediction")
        assert f"A1111's test run says {expected}" in caplog.text


def test_sdxl_two_encoders_and_pooled_size_conditioning(tmp_path):
    cache = save_tiny_tokenizer(tmp_path / "tokenizers", (KOHYA_NAMES[0], KOHYA_NAMES[2]))
    path = str(tmp_path / "sdxl.safetensors")
    ref = write_checkpoint(path, "sdxl", vocab=100)
    family = get_training_family("sdxl")
    c = family.load(path, tokenizer_cache_dir=cache)
    assert family.prediction_type == "epsilon" and c.vae.config.scaling_factor == 0.13025
    assert c.denoiser.config.addition_time_embed_dim == 8 and c.denoiser.config.transformer_layers_per_block == [1, 2]
    same_outputs(c, ref, "sdxl")
    cond = family.encode_text(c, ["a red square", "b"], "cpu")
    assert cond["encoder_hidden_states"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    name, _, encoders = load_components(path)
    assert [n for n, _ in encoders] == ["text_encoder", "text_encoder_2"]
    # ComfyUI marks v-prediction SDXL models with a "v_pred" key
    state = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(path), v_pred=torch.tensor([]))
    save_file(state, str(tmp_path / "vpred.safetensors"))
    assert describe(str(tmp_path / "vpred.safetensors")).prediction_type == "v_prediction"


def test_ckpt_only_through_weights_only(tmp_path):
    ckpt = str(tmp_path / "sd15.ckpt")
    ref = write_checkpoint(ckpt, "sd1", vocab=100)
    cache = save_tiny_tokenizer(tmp_path / "tok", KOHYA_NAMES[:1])
    same_outputs(get_training_family("sd1").load(ckpt, tokenizer_cache_dir=cache), ref, "sd1")

    class Payload:  # unpickling this would run code
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": Payload()}}, f)
    with pytest.raises(BaseModelError, match=r"evil.ckpt: .*weights_only.*convert the file to .safetensors"):
        describe(str(evil))
    assert not (tmp_path / "pwned").exists()


def test_fp16_file_loads_as_float32_and_matches(tmp_path):
    path = str(tmp_path / "half.safetensors")
    ref = write_checkpoint(path, "sd1", dtype=torch.float16, vocab=100)
    cache = save_tiny_tokenizer(tmp_path / "tok", KOHYA_NAMES[:1])
    c = get_training_family("sd1").load(path, tokenizer_cache_dir=cache)
    modules = [c.denoiser, c.vae, *c.text_encoders]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    for got, want in ((c.denoiser, ref["unet"]), (c.vae, ref["vae"]), (c.text_encoders[0], ref["text_encoders"][0])):
        for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
            torch.testing.assert_close(a, b.half().float(), msg=k)  # the file's fp16 values, upcast
    c = get_training_family("sd1").load(path, weight_dtype=torch.bfloat16, tokenizer_cache_dir=cache)
    assert c.denoiser.dtype == torch.bfloat16 and c.text_encoders[0].dtype == torch.bfloat16
    assert c.vae.dtype == torch.float32  # the VAE stays float32 unless stated


def test_tokenizer_cache_dir_is_filled_as_kohya_does(tmp_path):
    path = str(tmp_path / "sd15.safetensors")
    write_checkpoint(path, "sd1", vocab=100)
    cache = tmp_path / "cache"
    cache.mkdir()
    model = describe(path)
    from tsm_trainer.base_models.single_file import build_tokenizers

    first = build_tokenizers(model, str(cache))[0]
    assert (cache / KOHYA_NAMES[0] / "tokenizer_config.json").is_file()  # saved for the next run
    again = build_tokenizers(model, str(cache))[0]
    assert again("a photo of a cat").input_ids == first("a photo of a cat").input_ids


def test_missing_vocabulary_says_how_to_install_it(tmp_path, monkeypatch):
    path = str(tmp_path / "sd15.safetensors")
    write_checkpoint(path, "sd1", vocab=100)
    monkeypatch.setattr("tsm_trainer.base_models.single_file.tokenizers.find_bpe_file", lambda: None)
    with pytest.raises(
        BaseModelError,
        match=r"bpe_simple_vocab_16e6.txt.gz\) is not installed: install .*"
        r"pip install --no-deps open-clip-torch==3.3.0.*--tokenizer_cache_dir",
    ):
        get_training_family("sd1").load(path)


@pytest.mark.parametrize(
    "keys, message",
    [
        (
            {"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (4, 4)},
            r"SD3 / SD3.5 \(MM-DiT\) single-file checkpoint \(key 'model.diffusion_model.joint_blocks.0.context_block"
            r".attn.qkv.weight'\).*diffusers folder",
        ),
        ({"double_blocks.0.img_attn.qkv.weight": (4, 4)}, r"a Flux single-file checkpoint .*diffusers folder"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (2, 4)}, r"this is a LoRA"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4, 4)}, r"diffusers-layout weights of one component"),
        ({"foo.bar": (1,), "baz": (2,)}, r"unknown layout \(first keys: 'baz', 'foo.bar'\)"),
    ],
)
def test_unreadable_layouts_are_named(tmp_path, keys, message):
    path = str(tmp_path / "model.safetensors")
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    with pytest.raises(BaseModelError, match=message):
        load_components(path)


def test_incomplete_sd_files_are_named(tmp_path):
    from safetensors.torch import load_file

    path = str(tmp_path / "full.safetensors")
    write_checkpoint(path, "sd1", vocab=100)
    state = load_file(path)

    def refused(name, drop=(), change=None):
        p = str(tmp_path / name)
        save_file({**{k: v for k, v in state.items() if not k.startswith(drop or "\0")}, **(change or {})}, p)
        with pytest.raises(BaseModelError) as e:
            get_training_family("sd1").load(p)
        return str(e.value)

    assert "no VAE ('first_stage_model.*')" in refused("novae.safetensors", drop="first_stage_model.")
    assert "without a text encoder" in refused("note.safetensors", drop="cond_stage_model.")
    inpaint = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}
    assert "takes 9 input channels" in refused("inpaint.safetensors", change=inpaint)
    key = "model.diffusion_model.output_blocks.1.0.in_layers.2.weight"
    msg = refused("missing.safetensors", drop=key)
    assert "missing.safetensors: the UNet 'model.diffusion_model.*' does not match the SD layout" in msg
    assert "up_blocks.0.resnets.1.conv1.weight" in msg
    (tmp_path / "truncated.safetensors").write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(BaseModelError, match=r"truncated.safetensors: not a readable .safetensors file"):
        load_components(str(tmp_path / "truncated.safetensors"))
    with pytest.raises(BaseModelError, match=r"holds an sd1 model, not sdxl"):
        get_training_family("sdxl").load(path)
    with pytest.raises(BaseModelError, match=r"the sd3 family is read from a diffusers folder only"):
        get_training_family("sd3").load(path)


def test_clip_tokenizers_pad_as_the_families_do(tmp_path):
    from tsm_trainer.base_models.single_file import clip_tokenizer

    sd1 = clip_tokenizer("<|endoftext|>", "openai_clip-vit-large-patch14")
    sd2 = clip_tokenizer("!", "stabilityai_stable-diffusion-2")  # SD 2 and SDXL's second encoder pad with "!"
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0
    ids = sd2("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73
