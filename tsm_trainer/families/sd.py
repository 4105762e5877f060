"""SD 1.x / 2.x."""

from __future__ import annotations

import os

import torch
from torch import nn

from tsm_trainer.families.base import (
    Components,
    ConfigGetter,
    FamilySpec,
    FolderLayout,
    load_folder,
    require_folder,
    sample_images,
    single_file_components,
)

ATTENTION = ("to_q", "to_k", "to_v", r"to_out\.0")
CLIP_QV = ("q_proj", "v_proj")
SD_UNET_CLASS = "UNet2DConditionModel"  # diffusers' and sd-scripts' class name alike


def is_sdxl_config(get: ConfigGetter) -> bool:
    """A diffusers SDXL UNet has the size/crop ``text_time`` embedding."""
    return get("addition_embed_type") == "text_time"


def cross_attention_dim(get: ConfigGetter, denoiser: nn.Module | None) -> int | None:
    """From the config, else the in_features of the first cross-attention key projection
    (sd-scripts' UNet keeps no config)."""
    value = get("cross_attention_dim")
    if value or denoiser is None:
        return value
    for path, module in denoiser.named_modules():
        if path.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return None


SD1 = FamilySpec(
    "sd1",
    {"*": ATTENTION},
    {"clip": CLIP_QV},
    "ddpm",
    "sd_v1",
    "stable-diffusion-v1/lora",
    config_classes=(SD_UNET_CLASS,),
    accepts_config=lambda get, denoiser: not is_sdxl_config(get) and cross_attention_dim(get, denoiser) != 1024,
    metadata_needles=("v1", "sd_1"),
    checkpoint_roots=(("cond_stage_model.transformer.", "lora_te"),),
)  # transformers CLIPTextModel
SD2 = FamilySpec(
    "sd2",
    {"*": ATTENTION},
    {"clip": CLIP_QV},
    "ddpm",
    "sd_v2",
    "stable-diffusion-v2-768-v/lora",
    v2=True,
    resolution=768,
    config_classes=(SD_UNET_CLASS,),
    accepts_config=lambda get, denoiser: not is_sdxl_config(get) and cross_attention_dim(get, denoiser) == 1024,
    metadata_needles=("v2", "sd_2"),
    checkpoint_roots=(("cond_stage_model.model.", "lora_te"),),
)  # OpenCLIP


class StableDiffusionFamily:
    """SD 1.x / 2.x: VAE latents, one CLIP text encoder, DDPM noise, epsilon or v-prediction."""

    specs = (SD2, SD1)  # SD2 first: its metadata needles are tried before SD1's
    names = ("sd1", "sd2")

    def __init__(self, prediction_type: str = "auto"):
        self.prediction_type = prediction_type

    reads_single_files = True  # SD 1.x / 2.x / SDXL checkpoints (base_models/single_file); else folders only

    def folder_layout(self) -> FolderLayout:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return FolderLayout(
            (UNet2DConditionModel, "unet"),
            ((CLIPTextModel, "text_encoder"),),
            ((CLIPTokenizer, "tokenizer"),),
            DDPMScheduler,
        )

    def load(
        self,
        path: str,
        weight_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        tokenizer_cache_dir: str | None = None,
    ) -> Components:
        """A diffusers folder (:meth:`folder_layout`) or, where the family reads them, a single-file
        checkpoint. The frozen denoiser and text encoders are loaded in ``weight_dtype`` and the VAE in
        ``vae_dtype`` (both float32 unless given, whatever the files store; see
        ``base_models.loading.frozen_weight_dtype``). ``tokenizer_cache_dir``: kohya's option, for single
        files (a diffusers folder has its own tokenizer)."""
        if os.path.isfile(path) and self.reads_single_files:
            components, self.prediction_type = single_file_components(
                path, self.names, self.prediction_type, weight_dtype, vae_dtype, tokenizer_cache_dir
            )
            return components
        require_folder(path, self.names[0])
        components = load_folder(path, self.folder_layout(), weight_dtype, vae_dtype, tokenizer_cache_dir)
        if self.prediction_type == "auto":
            self.prediction_type = components.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{path}: prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        return components

    @property
    def num_train_timesteps(self) -> int:
        return 1000

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L, D)}"""
        tokenizer = c.tokenizers[0]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return {"encoder_hidden_states": c.text_encoders[0](ids)[0]}

    def encode_images(
        self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f), sampled with ``generator``."""
        dist = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        return latents * c.vae.config.scaling_factor

    def noisy_input_and_target(self, c: Components, latents, noise, timesteps):
        noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            return noisy, c.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, noise

    def predict(self, c: Components, noisy, timesteps, cond: dict) -> torch.Tensor:
        return c.denoiser(noisy, timesteps, cond["encoder_hidden_states"]).sample

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        """PIL images of ``prompts`` with whatever network is applied to the UNet (DDIM, fixed seed)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            tokenizer=c.tokenizers[0],
            unet=c.denoiser,
            scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return sample_images(pipe, prompts, steps, guidance, size, seed)

    def loss_weights(self, c: Components, timesteps, min_snr_gamma: float) -> torch.Tensor | None:
        """Per-sample min-SNR weights (Hang et al. 2023), or None when off."""
        if not min_snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(c.noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma)
        return weight / (snr + 1) if self.prediction_type == "v_prediction" else weight / snr
