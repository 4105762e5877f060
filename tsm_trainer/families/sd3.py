"""SD3 / SD3.5 (MM-DiT, rectified flow)."""

from __future__ import annotations

import torch

from tsm_trainer.families.base import Components, FamilySpec, FolderLayout, load_folder, require_folder, sample_images
from tsm_trainer.families.sd import ATTENTION

CLIP_QKVO = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_QV = (r"SelfAttention\.q", r"SelfAttention\.v")

SD3 = FamilySpec(
    "sd3",
    {"MMDiT": (r"attn\.qkv", r"attn\.proj"), "*": ATTENTION},
    {"clip": CLIP_QKVO, "t5": T5_QV},
    "flow",
    "sd3",
    "stable-diffusion-3-medium/lora",
    resolution=1024,
    denoiser_classes=("SD3Transformer2DModel", "MMDiT"),
    transformer_classes=("SD3Transformer2DModel",),
    metadata_needles=("sd3", "stable-diffusion-3"),
    single_file_refusal=("SD3 / SD3.5 (MM-DiT)", "joint_blocks.0."),
)


class StableDiffusion3Family:
    """SD3 / SD3.5 (MM-DiT): rectified flow. ``x_s = (1 - s) x + s n``, target ``n - x``, the
    transformer receives ``t = s * T``. Timesteps follow the logit-normal density of SD3's
    training, restricted to the step's interval by inverse-CDF sampling. Text: two CLIP encoders
    (penultimate states, zero-padded to T5's width) followed by T5 tokens; pooled CLIP projections."""

    specs = (SD3,)
    names = ("sd3",)
    num_train_timesteps = 1000
    prediction_type = "flow"

    def __init__(self, prediction_type: str = "auto", logit_mean: float = 0.0, logit_std: float = 1.0):
        if prediction_type not in ("auto", "flow"):
            raise ValueError(f"SD3 is a flow-matching model; --prediction_type {prediction_type} does not apply")
        self.normal = torch.distributions.Normal(logit_mean, logit_std)

    def folder_layout(self) -> FolderLayout:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        return FolderLayout(
            (SD3Transformer2DModel, "transformer"),
            (
                (CLIPTextModelWithProjection, "text_encoder"),
                (CLIPTextModelWithProjection, "text_encoder_2"),
                (T5EncoderModel, "text_encoder_3"),
            ),
            ((CLIPTokenizer, "tokenizer"), (CLIPTokenizer, "tokenizer_2"), (T5Tokenizer, "tokenizer_3")),
            FlowMatchEulerDiscreteScheduler,
        )

    def load(
        self,
        folder: str,
        weight_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        tokenizer_cache_dir: str | None = None,
    ) -> Components:
        """A diffusers folder (:meth:`folder_layout`); frozen weights in ``weight_dtype``, the VAE in
        ``vae_dtype`` (float32 unless given). ``tokenizer_cache_dir`` applies to single files, which this
        family does not read."""
        require_folder(folder, self.names[0])
        return load_folder(folder, self.folder_layout(), weight_dtype, vae_dtype, tokenizer_cache_dir)

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, 77 + L5, D5), "pooled_projections": (B, P1 + P2)}"""
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(c.tokenizers[:2], c.text_encoders[:2]):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5_tokenizer = c.tokenizers[2]
        ids = t5_tokenizer(
            captions,
            padding="max_length",
            max_length=min(t5_tokenizer.model_max_length, 256),
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        t5 = c.text_encoders[2](ids)[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def encode_images(
        self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        dist = c.vae.encode(pixels.to(c.vae.dtype)).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        shift = c.vae.config.shift_factor or 0.0
        return (latents - shift) * c.vae.config.scaling_factor

    def draw_timesteps(self, lo: float, hi: float, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) float t = s * T with s logit-normal, restricted to [lo, hi)."""
        T = self.num_train_timesteps
        bounds = torch.tensor([lo / T, hi / T], dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
        cdf = self.normal.cdf(torch.logit(bounds))
        u = cdf[0] + (cdf[1] - cdf[0]) * torch.rand(batch, generator=generator, dtype=torch.float64)
        t = torch.sigmoid(self.normal.icdf(u)) * T
        return t.clamp(lo, torch.nextafter(torch.tensor(float(hi), dtype=torch.float64), torch.tensor(0.0)))

    def noisy_input_and_target(self, c: Components, latents, noise, timesteps):
        s = (timesteps.to(latents.dtype) / self.num_train_timesteps).view(-1, *([1] * (latents.dim() - 1)))
        return (1 - s) * latents + s * noise, noise - latents

    def predict(self, c: Components, noisy, timesteps, cond: dict) -> torch.Tensor:
        return c.denoiser(
            hidden_states=noisy,
            timestep=timesteps.to(noisy.dtype),
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample

    def loss_weights(self, c: Components, timesteps, min_snr_gamma: float):
        if min_snr_gamma:
            raise ValueError("--min_snr_gamma weights DDPM losses; SD3 trains with the logit-normal timestep density")
        return None

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=c.denoiser,
            scheduler=c.noise_scheduler,
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            tokenizer=c.tokenizers[0],
            text_encoder_2=c.text_encoders[1],
            tokenizer_2=c.tokenizers[1],
            text_encoder_3=c.text_encoders[2],
            tokenizer_3=c.tokenizers[2],
        )
        return sample_images(pipe, prompts, steps, guidance, size, seed)
