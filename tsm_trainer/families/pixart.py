"""PixArt-alpha / sigma."""

from __future__ import annotations

import torch

from tsm_trainer.families.base import Components, FamilySpec, FolderLayout, sample_images
from tsm_trainer.families.sd import ATTENTION, StableDiffusionFamily
from tsm_trainer.families.sd3 import T5_QV

PIXART = FamilySpec(
    "pixart",
    {"*": ATTENTION},
    {"t5": T5_QV},
    "ddpm",
    "pixart_alpha",
    "pixart-alpha/lora",
    resolution=512,
    denoiser_classes=("PixArtTransformer2DModel", "PixArtMS", "PixArt"),
    transformer_classes=("PixArtTransformer2DModel",),
    metadata_needles=("pixart",),
)


class PixArtFamily(StableDiffusionFamily):
    """PixArt-alpha/sigma (DiT): one T5 encoder with its attention mask, DDPM noise, epsilon
    prediction; a transformer that also predicts the variance (2x channels) is trained on the
    epsilon half, as its pipelines read it."""

    specs = (PIXART,)
    names = ("pixart",)

    reads_single_files = False

    def folder_layout(self) -> FolderLayout:
        from diffusers import DDPMScheduler, PixArtTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer

        return FolderLayout(
            (PixArtTransformer2DModel, "transformer"),
            ((T5EncoderModel, "text_encoder"),),
            ((T5Tokenizer, "tokenizer"),),
            DDPMScheduler,
        )

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L, D), "encoder_attention_mask": (B, L)}"""
        tokenizer = c.tokenizers[0]
        tokens = tokenizer(
            captions,
            padding="max_length",
            max_length=min(tokenizer.model_max_length, 120),
            truncation=True,
            return_tensors="pt",
        ).to(device)
        mask = tokens.attention_mask
        return {
            "encoder_hidden_states": c.text_encoders[0](tokens.input_ids, attention_mask=mask)[0],
            "encoder_attention_mask": mask,
        }

    def predict(self, c: Components, noisy, timesteps, cond: dict) -> torch.Tensor:
        out = c.denoiser(
            noisy,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps,
            encoder_attention_mask=cond["encoder_attention_mask"],
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        return out[:, : noisy.shape[1]] if out.shape[1] == 2 * noisy.shape[1] else out

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import DDIMScheduler, PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline(
            tokenizer=c.tokenizers[0],
            text_encoder=c.text_encoders[0],
            vae=c.vae,
            transformer=c.denoiser,
            scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
        )
        return sample_images(
            pipe,
            prompts,
            steps,
            guidance,
            size,
            seed,
            use_resolution_binning=False,
            max_sequence_length=min(c.tokenizers[0].model_max_length, 120),
        )
