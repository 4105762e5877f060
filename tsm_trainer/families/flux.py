"""Flux.1."""

from __future__ import annotations

import torch

from tsm_trainer.families.base import Components, FamilySpec, FolderLayout, sample_images
from tsm_trainer.families.sd import ATTENTION, CLIP_QV
from tsm_trainer.families.sd3 import T5_QV, StableDiffusion3Family

FLUX = FamilySpec(
    "flux",
    {
        "Flux": (r"(img|txt)_attn\.(qkv|proj)", r"single_blocks\.\d+\.linear[12]"),
        "*": ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    },
    {"clip": CLIP_QV, "t5": T5_QV},
    "flow",
    "flux1",
    "flux-1-dev/lora",
    resolution=1024,
    denoiser_classes=("FluxTransformer2DModel", "Flux"),
    transformer_classes=("FluxTransformer2DModel",),
    sigma_input_classes=("FluxTransformer2DModel", "Flux"),
    forge_predictors=("PredictionFlux",),
    metadata_needles=("flux",),
    single_file_refusal=("Flux", "double_blocks.0.img_attn"),
)


class FluxFamily(StableDiffusion3Family):
    """Flux.1: rectified flow like SD3, on 2x2-packed latent tokens with position ids; the
    transformer receives sigma (the network's hook maps it to t = sigma * T). Text: CLIP pooled
    output + T5 tokens. Guidance-distilled models get the guidance embedding at 1.0 in training."""

    specs = (FLUX,)
    names = ("flux",)
    guidance = 1.0

    def folder_layout(self) -> FolderLayout:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        return FolderLayout(
            (FluxTransformer2DModel, "transformer"),
            ((CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")),
            ((CLIPTokenizer, "tokenizer"), (T5Tokenizer, "tokenizer_2")),
            FlowMatchEulerDiscreteScheduler,
        )

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L5, D5), "pooled_projections": (B, P)}"""
        clip_tok, t5_tok = c.tokenizers
        ids = clip_tok(
            captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        pooled = c.text_encoders[0](ids).pooler_output
        ids = t5_tok(
            captions,
            padding="max_length",
            max_length=min(t5_tok.model_max_length, 512),
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return {"encoder_hidden_states": c.text_encoders[1](ids)[0], "pooled_projections": pooled}

    def predict(self, c: Components, noisy, timesteps, cond: dict) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, ch, h, w = noisy.shape
        tokens = FluxPipeline._pack_latents(noisy, b, ch, h, w)  # (B, h/2 * w/2, 4C)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        states = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if c.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=noisy.dtype)
        out = c.denoiser(
            hidden_states=tokens,
            timestep=timesteps.to(noisy.dtype) / self.num_train_timesteps,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=states,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        # Unpack: (B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of _pack_latents.
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(
            scheduler=c.noise_scheduler,
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            tokenizer=c.tokenizers[0],
            text_encoder_2=c.text_encoders[1],
            tokenizer_2=c.tokenizers[1],
            transformer=c.denoiser,
        )
        return sample_images(
            pipe, prompts, steps, guidance, size, seed, max_sequence_length=min(c.tokenizers[1].model_max_length, 512)
        )
