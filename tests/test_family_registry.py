"""The family registry (tsm_trainer.families) answers every question the scattered tables answered
before issue 14, detection runs once, and a new family is one module."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest
import torch
from PIL import Image
from torch import nn

import tsm_trainer.families as registry
from tests.tiny_models import (
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
    tiny_sd_pipeline_folder,
    tiny_sdxl_unet,
    tiny_unet,
    tiny_unet3d,
)
from tsm_trainer.base_models.single_file.layout import other_families
from tsm_trainer.core.targets import denoiser_naming
from tsm_trainer.core.timestep import sigma_input_classes
from tsm_trainer.families import (
    FAMILY_CLASSES,
    detect_family,
    detect_folder_family,
    family_names,
    get_family,
    get_training_family,
    training_class,
)
from tsm_trainer.files.bake import checkpoint_family
from tsm_trainer.files.family_guess import guess_family
from tsm_trainer.training.config import build_parser

# What core/targets.py's FAMILIES held before the move: (ss_base_model_version, modelspec.architecture,
# v2, resolution, timestep space).
BEFORE = {
    "sd1": ("sd_v1", "stable-diffusion-v1/lora", False, 512, "ddpm"),
    "sd2": ("sd_v2", "stable-diffusion-v2-768-v/lora", True, 768, "ddpm"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", False, 1024, "ddpm"),
    "sd3": ("sd3", "stable-diffusion-3-medium/lora", False, 1024, "flow"),
    "flux": ("flux1", "flux-1-dev/lora", False, 1024, "flow"),
    "pixart": ("pixart_alpha", "pixart-alpha/lora", False, 512, "ddpm"),
    "video": ("t2v_unet3d", "text-to-video-unet3d/lora", False, 256, "ddpm"),
}
ATTENTION = ("to_q", "to_k", "to_v", r"to_out\.0")


def test_specs_hold_the_previous_metadata_and_targets():
    assert family_names() == tuple(sorted(BEFORE))
    for name, (version, arch, v2, resolution, space) in BEFORE.items():
        spec = get_family(name)
        assert (
            spec.base_model_version,
            spec.modelspec_architecture,
            spec.v2,
            spec.resolution,
            spec.timestep_space,
        ) == (version, arch, v2, resolution, space)
    assert get_family("sd1").denoiser_targets == {"*": ATTENTION}
    assert get_family("sd3").denoiser_targets["MMDiT"] == (r"attn\.qkv", r"attn\.proj")
    assert get_family("flux").denoiser_targets["*"] == ATTENTION + (
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )
    assert get_family("video").denoiser_targets == {"*": ("to_k", "to_v")}
    assert get_family("video").text_encoder_targets == {"clip": ("out_proj",)}
    assert set(get_family("sd3").text_encoder_targets) == {"clip", "t5"}
    assert set(get_family("pixart").text_encoder_targets) == {"t5"}
    with pytest.raises(ValueError, match=r"unknown family 'sd4'; valid: \['flux', 'pixart', 'sd1'"):
        get_family("sd4")


def test_one_training_class_per_module_and_sd1_sd2_share_one():
    assert training_class("sd1") is training_class("sd2") is registry.StableDiffusionFamily
    assert {training_class(n) for n in family_names()} == set(FAMILY_CLASSES)
    assert get_training_family("sd2", "v_prediction").prediction_type == "v_prediction"


def _named(cls_name: str, **layers) -> nn.Module:
    """A module whose class is called ``cls_name`` (sd-scripts' classes carry no diffusers config)."""
    module = type(cls_name, (nn.Module,), {})()
    for path, layer in layers.items():
        module.add_module(path, layer)
    return module


def _sd_scripts_unet(cross: int) -> nn.Module:
    attn2 = nn.Module()
    attn2.to_k = nn.Linear(cross, 8)
    return _named("UNet2DConditionModel", attn2=attn2)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: tiny_unet(), "sd1"),
        (lambda: tiny_unet(cross_attention_dim=1024), "sd2"),
        (tiny_sdxl_unet, "sdxl"),
        (tiny_unet3d, "video"),
        (tiny_sd3, "sd3"),
        (tiny_flux, "flux"),
        (tiny_pixart, "pixart"),
        # sd-scripts' classes, detected by name (and the cross-attention width for its UNet)
        (lambda: _sd_scripts_unet(768), "sd1"),
        (lambda: _sd_scripts_unet(1024), "sd2"),
        (lambda: _named("SdxlUNet2DConditionModel"), "sdxl"),
        (lambda: _named("MMDiT"), "sd3"),
        (lambda: _named("Flux"), "flux"),
        (lambda: _named("PixArtMS"), "pixart"),
        (lambda: _named("PixArt"), "pixart"),
    ],
)
def test_detect_family_from_class_and_config(make, name, tmp_path):
    model = make()
    assert detect_family(model).name == name
    if hasattr(model, "save_config"):  # a diffusers folder: the same answer from its config.json alone
        sub = "unet" if "UNet" in type(model).__name__ else "transformer"
        model.save_config(str(tmp_path / sub))
        assert detect_folder_family(str(tmp_path)).name == name


def test_detection_errors_name_the_class_and_the_file(tmp_path):
    with pytest.raises(ValueError, match="unknown denoiser class Mystery: supported are .*MMDiT.*UNet3DConditionModel"):
        detect_family(_named("Mystery"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "Mystery"}))
    with pytest.raises(ValueError, match=r"unet.config\.json: unknown denoiser class Mystery"):
        detect_folder_family(str(tmp_path))
    with pytest.raises(ValueError, match="no unet/config.json or transformer/config.json"):
        detect_folder_family(str(tmp_path / "unet"))


def test_key_naming_comes_from_the_spec():
    sdxl = tiny_sdxl_unet()
    prefix, translate = denoiser_naming(sdxl, get_family("sdxl"))
    assert prefix == "lora_unet" and translate("down_blocks.1.attentions.0.proj_in") == "input_blocks.4.1.proj_in"
    for make, name in ((tiny_sd3, "sd3"), (tiny_flux, "flux"), (tiny_pixart, "pixart")):
        assert denoiser_naming(make(), get_family(name))[0] == "lora_transformer"
    for model, name in ((_named("MMDiT"), "sd3"), (_named("Flux"), "flux"), (tiny_unet3d(), "video")):
        prefix, translate = denoiser_naming(model, get_family(name))
        assert prefix == "lora_unet" and translate("a.b") == "a.b"


def test_tables_that_were_hard_coded_read_the_specs():
    assert sigma_input_classes() == {"FluxTransformer2DModel", "Flux"}
    assert other_families() == (("SD3 / SD3.5 (MM-DiT)", "joint_blocks.0."), ("Flux", "double_blocks.0.img_attn"))
    parser = build_parser()
    family_action = next(a for a in parser._actions if a.dest == "family")
    assert set(family_action.choices) == {"auto", "sd1", "sd2", "sdxl", "sd3", "flux", "pixart", "video"}
    # bake: the text-encoder roots of an original-layout checkpoint pick the family
    assert checkpoint_family(["model.diffusion_model.x", "conditioner.embedders.1.model.y"]).name == "sdxl"
    assert checkpoint_family(["model.diffusion_model.x", "cond_stage_model.model.y"]).name == "sd2"
    assert checkpoint_family(["model.diffusion_model.x", "cond_stage_model.transformer.y"]).name == "sd1"
    assert checkpoint_family(["model.diffusion_model.x"]).name == "sd1"
    assert get_family("sdxl").checkpoint_roots == (
        ("conditioner.embedders.0.transformer.", "lora_te1"),
        ("conditioner.embedders.1.model.", "lora_te2"),
    )


@pytest.mark.parametrize(
    "text, name",
    [
        ("sdxl_v1", "sdxl"),
        ("SD_XL_custom", "sdxl"),
        ("sd3.5", "sd3"),
        ("stable-diffusion-3.5-large/lora", "sd3"),
        ("flux-dev", "flux"),
        ("PixArt-Sigma", "pixart"),
        ("modelscope_video", "video"),
        ("t2v", "video"),
        ("sd_v2_x", "sd2"),
        ("sd_2-1", "sd2"),
        ("v1-5", "sd1"),
        ("sd_1", "sd1"),
        ("sd_v1", "sd1"),
        ("stable-diffusion-v2-768-v/lora", "sd2"),
        ("text-to-video-unet3d/lora", "video"),
        ("nothing", "unknown"),
    ],
)
def test_guess_family_from_metadata_strings(text, name):
    """The needles and their order of the former hard-coded list: 'xl' wins over 'v1', 'v2' over 'v1'."""
    got = guess_family({"ss_base_model_version": text})["name"]
    assert got == name or (name == "unknown" and got == "unknown")


def test_trainer_detects_the_family_once_from_configs(tmp_path, monkeypatch):
    """build() reads the folder's configs once (no meta-device skeleton) and the components carry the family."""
    from tsm_trainer.base_models import loading
    from tsm_trainer.training import build as build_module
    from tsm_trainer.training.config import load_config

    base = tiny_sd_pipeline_folder(str(tmp_path / "base"))
    images = tmp_path / "images"
    (images / "1_red").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), "red").save(images / "1_red" / f"{i}.png")
        (images / "1_red" / f"{i}.txt").write_text("a red square")
    calls = []
    real = build_module.detect_folder_family
    monkeypatch.setattr(build_module, "detect_folder_family", lambda path: calls.append(path) or real(path))

    def no_skeleton(*args, **kwargs):
        raise AssertionError("a meta-device skeleton was built to detect the family")

    monkeypatch.setattr(loading, "load_components", no_skeleton)
    reads = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith(os.path.join("unet", "config.json")):
            reads.append(file)
        return real_open(file, *args, **kwargs)

    config = load_config(
        [
            "--pretrained_model",
            base,
            "--train_data_dir",
            str(images),
            "--resolution",
            "16",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "1",
        ]
    )
    monkeypatch.setattr("builtins.open", counting_open)
    trainer = build_module.build(config, log=lambda *a: None)
    monkeypatch.undo()
    assert calls == [base]
    assert trainer.c.family is get_family("sd1")
    # once for detection, once by diffusers' from_pretrained when it loads the UNet
    assert len(reads) == 2


SMALLEST_FAMILY_COPY = '''
"""A toy family: the video family's behaviour under another name and denoiser class."""

from tsm_trainer.families.base import FamilySpec
from tsm_trainer.families.video import TextToVideoFamily

TOY = FamilySpec("toy", {"*": ("to_k", "to_v")}, {"clip": ("out_proj",)}, "ddpm", "toy_v1", "toy/lora",
                 resolution=64, denoiser_classes=("ToyDenoiser",), metadata_needles=("toy",))


class ToyFamily(TextToVideoFamily):
    specs = (TOY,)
    names = ("toy",)
'''


@pytest.fixture
def toy_module(tmp_path):
    path = tmp_path / "toy_family.py"
    path.write_text(textwrap.dedent(SMALLEST_FAMILY_COPY))
    spec = importlib.util.spec_from_file_location("toy_family", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("toy_family", None)


def test_a_new_family_is_one_module(toy_module, monkeypatch, tmp_path):
    from tsm_trainer.core.network import TSMConfig, TSMNetwork

    families = FAMILY_CLASSES + (toy_module.ToyFamily,)
    # passed explicitly ...
    assert get_family("toy", families) is toy_module.TOY
    assert "toy" in family_names(families) and "toy" not in family_names()
    # ... or registered by extending the registry tuple (the one place the shipped families are listed)
    monkeypatch.setattr(registry, "FAMILY_CLASSES", families)
    assert get_family("toy").modelspec_architecture == "toy/lora"
    assert isinstance(get_training_family("toy"), toy_module.ToyFamily)
    toy = _named("ToyDenoiser", to_k=nn.Linear(4, 4), to_v=nn.Linear(4, 4), to_q=nn.Linear(4, 4))
    assert detect_family(toy) is toy_module.TOY
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "ToyDenoiser"}))
    assert detect_folder_family(str(tmp_path)) is toy_module.TOY
    assert guess_family({"ss_base_model_version": "toy_v1"})["name"] == "toy"
    args = build_parser().parse_args(["--family", "toy"])
    assert args.family == "toy"
    # the core picks its targets and key names from the spec
    net = TSMNetwork(TSMConfig(scales=[2], rank=2, alpha=2), toy, [])
    assert net.family is toy_module.TOY
    assert sorted(lora.lora_name for lora in net.denoiser_loras) == ["lora_unet_to_k", "lora_unet_to_v"]
    with torch.no_grad():
        assert toy.to_k(torch.ones(1, 4)).shape == (1, 4)


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--family", "sd3", "--v_parameterization"], "--v_parameterization does not apply to --family sd3"),
        (["--family", "flux", "--v_parameterization"], "--v_parameterization does not apply to --family flux"),
        (["--v2", "--family", "sdxl"], "--v2 and --family sdxl disagree"),
        (["--v2", "--family", "sd2"], "--pretrained_model_name_or_path"),  # accepted: fails later, on the missing model
        (["--family", "sdxl", "--v_parameterization"], "--pretrained_model_name_or_path"),
    ],
)
def test_family_flags_are_checked_against_the_spec(flags, error, tmp_path):
    from tsm_trainer.training.config import load_config
    from tsm_trainer.training.validate import check_config

    config = load_config(
        [
            "--pretrained_model",
            str(tmp_path / "missing"),
            "--train_data_dir",
            str(tmp_path),
            "--resolution",
            "16",
            "--output_dir",
            str(tmp_path / "out"),
            *flags,
        ]
    )
    with pytest.raises(ValueError, match=error):
        check_config(config)
