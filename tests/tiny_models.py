"""Tiny random-init models for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import torch


def tiny_unet(cross_attention_dim: int = 16, seed: int = 0, **overrides):
    """SD-shaped diffusers UNet2DConditionModel with a few thousand parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_clip(hidden_size: int = 16, seed: int = 0, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=100, hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden_size)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()
