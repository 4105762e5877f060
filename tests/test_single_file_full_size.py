"""The header of a full-size SD 1.5 / SD 2.1 / SDXL single file gives the published diffusers
architectures (heads included: they are not visible in tensor shapes). Built on the meta device:
shapes only, no memory."""

from types import SimpleNamespace

import pytest
import torch

from tests.ldm_checkpoints import clip_to_ldm, clip_to_open_clip, unet_to_ldm, vae_to_ldm
from tsm_trainer.base_models.single_file.loader import describe_checkpoint

CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
OPEN_CLIP_H = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=1024,
)
OPEN_CLIP_BIG_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL_UNET = dict(
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)


def meta(cls, **config):
    with torch.device("meta"):
        return cls(**config)


def clip(config, projection=False, layers=None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(config, max_position_embeddings=77, **({"num_hidden_layers": layers} if layers else {}))
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_headers_give_the_published_architectures(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg = {"sd1": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}[family]
    unet = meta(UNet2DConditionModel, **unet_cfg)
    state = {**unet_to_ldm(unet), **vae_to_ldm(meta(AutoencoderKL, **SD_VAE))}
    if family == "sd1":
        encoders = [(CLIP_L, clip_to_ldm(clip(CLIP_L), "cond_stage_model.transformer."))]
    elif family == "sd2":  # SD 2 files hold all 24 OpenCLIP layers; SD 2 uses 23
        encoders = [
            (OPEN_CLIP_H, clip_to_open_clip(clip(OPEN_CLIP_H, True, 23), "cond_stage_model.model.", extra_layer=True))
        ]
    else:
        encoders = [
            (CLIP_L, clip_to_ldm(clip(CLIP_L), "conditioner.embedders.0.transformer.")),
            (OPEN_CLIP_BIG_G, clip_to_open_clip(clip(OPEN_CLIP_BIG_G, True), "conditioner.embedders.1.model.")),
        ]
    for _, part in encoders:
        state.update(part)
    header = SimpleNamespace(path="full.safetensors", shapes={k: tuple(v.shape) for k, v in state.items()}, metadata={})
    model = describe_checkpoint(header, "epsilon")
    assert model.family == family
    for key, value in unet_cfg.items():
        assert model.unet[key] == value, key
    rebuilt = meta(UNet2DConditionModel, **model.unet)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}
    for key, value in SD_VAE.items():
        assert model.vae[key] == value, key
    assert model.vae["scaling_factor"] == (0.13025 if family == "sdxl" else 0.18215)
    for (want, _), got in zip(encoders, model.text_encoders, strict=True):
        for key, value in want.items():
            if key != "projection_dim" or family == "sdxl":
                assert got[key] == value, key
