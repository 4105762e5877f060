"""SDXL."""

from __future__ import annotations

import torch

from tsm_trainer.families.base import Components, FamilySpec, FolderLayout, sample_images
from tsm_trainer.families.sd import ATTENTION, CLIP_QV, SD_UNET_CLASS, StableDiffusionFamily, is_sdxl_config

SDXL = FamilySpec(
    "sdxl",
    {"*": ATTENTION},
    {"clip": CLIP_QV},
    "ddpm",
    "sdxl_base_v1-0",
    "stable-diffusion-xl-v1-base/lora",
    resolution=1024,
    denoiser_classes=("SdxlUNet2DConditionModel",),
    config_classes=(SD_UNET_CLASS,),
    accepts_config=lambda get, denoiser: is_sdxl_config(get),
    sgm_unet_names=True,
    metadata_needles=("xl",),
    checkpoint_roots=(
        ("conditioner.embedders.0.transformer.", "lora_te1"),  # CLIP-L
        ("conditioner.embedders.1.model.", "lora_te2"),
    ),
)  # OpenCLIP bigG


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP encoders (penultimate hidden states concatenated; pooled projection of the
    second), size/crop conditioning ``time_ids``, DDPM noise, epsilon or v-prediction."""

    specs = (SDXL,)
    names = ("sdxl",)

    def folder_layout(self) -> FolderLayout:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return FolderLayout(
            (UNet2DConditionModel, "unet"),
            ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")),
            ((CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2")),
            DDPMScheduler,
        )

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L, D1 + D2), "text_embeds": (B, P)}"""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(c.tokenizers, c.text_encoders):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def predict(self, c: Components, noisy, timesteps, cond: dict) -> torch.Tensor:
        # Size conditioning: original = target = the training resolution, no crop.
        h, w = (noisy.shape[-2] * 8, noisy.shape[-1] * 8)
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=noisy.dtype, device=noisy.device).repeat(noisy.shape[0], 1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return c.denoiser(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added).sample

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0],
            tokenizer_2=c.tokenizers[1],
            unet=c.denoiser,
            scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
        )
        return sample_images(pipe, prompts, steps, guidance, size, seed)
