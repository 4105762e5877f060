"""Model families of the trainer: how to load a base model, encode text and images, add
noise and form the training target. Registered in one place (``TRAINING_FAMILIES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Components:
    """A loaded base model. ``denoiser`` is the UNet/transformer the network is applied to."""

    denoiser: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    vae: nn.Module
    noise_scheduler: object


class StableDiffusionFamily:
    """SD 1.x / 2.x: VAE latents, one CLIP text encoder, DDPM noise, epsilon or v-prediction."""

    names = ("sd1", "sd2")

    def __init__(self, prediction_type: str = "auto"):
        self.prediction_type = prediction_type

    def load(self, folder: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        if self.prediction_type == "auto":
            self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{folder}: prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        return Components(unet, [text_encoder], [tokenizer], vae, scheduler)

    @property
    def num_train_timesteps(self) -> int:
        return 1000

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L, D)}"""
        tokenizer = c.tokenizers[0]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return {"encoder_hidden_states": c.text_encoders[0](ids)[0]}

    def encode_images(self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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

        pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                       unet=c.denoiser, scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                        generator=generator).images

    def loss_weights(self, c: Components, timesteps, min_snr_gamma: float) -> torch.Tensor | None:
        """Per-sample min-SNR weights (Hang et al. 2023), or None when off."""
        if not min_snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(c.noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=min_snr_gamma)
        return weight / (snr + 1) if self.prediction_type == "v_prediction" else weight / snr


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP encoders (penultimate hidden states concatenated; pooled projection of the
    second), size/crop conditioning ``time_ids``, DDPM noise, epsilon or v-prediction."""

    names = ("sdxl",)

    def load(self, folder: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        kw = dict(local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
                    CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s, **kw) for s in ("tokenizer", "tokenizer_2")]
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
        if self.prediction_type == "auto":
            self.prediction_type = scheduler.config.prediction_type
        return Components(unet, encoders, tokenizers, vae, scheduler)

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L, D1 + D2), "text_embeds": (B, P)}"""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(c.tokenizers, c.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
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

        pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                                         tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.denoiser,
                                         scheduler=DDIMScheduler.from_config(c.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                        generator=torch.Generator().manual_seed(seed)).images


class TextToVideoFamily(StableDiffusionFamily):
    """Text-to-video 3D UNet (diffusers ``UNet3DConditionModel``, ModelScope/VideoCrafter style):
    frames encoded by the image VAE one by one, one CLIP encoder, DDPM noise on (B, C, F, h, w)."""

    names = ("video",)

    def load(self, folder: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kw = dict(local_files_only=True)
        unet = UNet3DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
        if self.prediction_type == "auto":
            self.prediction_type = scheduler.config.prediction_type
        return Components(unet, [text_encoder], [tokenizer], vae, scheduler)

    def encode_images(self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, F, 3, H, W) clips in [-1, 1] -> scaled latents (B, 4, F, H/f, W/f)."""
        if pixels.dim() != 5:
            raise ValueError(f"the video family trains on clips (B, F, 3, H, W); got a batch of shape "
                             f"{tuple(pixels.shape)} (set video_frames in the dataset config)")
        b, f = pixels.shape[:2]
        latents = super().encode_images(c, pixels.flatten(0, 1), generator)
        return latents.unflatten(0, (b, f)).transpose(1, 2)

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        """The first frame of each prompt's clip (a grid of clips would not fit one image)."""
        from diffusers import DDIMScheduler, TextToVideoSDPipeline

        pipe = TextToVideoSDPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                     unet=c.denoiser, scheduler=DDIMScheduler.from_config(c.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        images = []
        with torch.no_grad():
            for prompt in prompts:
                frames = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                              num_frames=2, generator=torch.Generator().manual_seed(seed), output_type="pil").frames
                images.append(frames[0][0])
        return images


class StableDiffusion3Family:
    """SD3 / SD3.5 (MM-DiT): rectified flow. ``x_s = (1 - s) x + s n``, target ``n - x``, the
    transformer receives ``t = s * T``. Timesteps follow the logit-normal density of SD3's
    training, restricted to the step's interval by inverse-CDF sampling. Text: two CLIP encoders
    (penultimate states, zero-padded to T5's width) followed by T5 tokens; pooled CLIP projections."""

    names = ("sd3",)
    num_train_timesteps = 1000
    prediction_type = "flow"

    def __init__(self, prediction_type: str = "auto", logit_mean: float = 0.0, logit_std: float = 1.0):
        if prediction_type not in ("auto", "flow"):
            raise ValueError(f"SD3 is a flow-matching model; --prediction_type {prediction_type} does not apply")
        self.normal = torch.distributions.Normal(logit_mean, logit_std)

    def load(self, folder: str) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        kw = dict(local_files_only=True)
        transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", **kw)
        encoders = [CLIPTextModelWithProjection.from_pretrained(folder, subfolder=s, **kw)
                    for s in ("text_encoder", "text_encoder_2")]
        encoders.append(T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", **kw))
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s, **kw) for s in ("tokenizer", "tokenizer_2")]
        tokenizers.append(T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_3", **kw))
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
        return Components(transformer, encoders, tokenizers, vae, scheduler)

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, 77 + L5, D5), "pooled_projections": (B, P1 + P2)}"""
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(c.tokenizers[:2], c.text_encoders[:2]):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            clip_states.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5_tokenizer = c.tokenizers[2]
        ids = t5_tokenizer(captions, padding="max_length", max_length=min(t5_tokenizer.model_max_length, 256),
                           truncation=True, return_tensors="pt").input_ids.to(device)
        t5 = c.text_encoders[2](ids)[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def encode_images(self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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
        return c.denoiser(hidden_states=noisy, timestep=timesteps.to(noisy.dtype),
                          encoder_hidden_states=cond["encoder_hidden_states"],
                          pooled_projections=cond["pooled_projections"]).sample

    def loss_weights(self, c: Components, timesteps, min_snr_gamma: float):
        if min_snr_gamma:
            raise ValueError("--min_snr_gamma weights DDPM losses; SD3 trains with the logit-normal timestep density")
        return None

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=c.denoiser, scheduler=c.noise_scheduler, vae=c.vae,
                                        text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                        text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1],
                                        text_encoder_3=c.text_encoders[2], tokenizer_3=c.tokenizers[2])
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                        generator=torch.Generator().manual_seed(seed)).images


class PixArtFamily(StableDiffusionFamily):
    """PixArt-alpha/sigma (DiT): one T5 encoder with its attention mask, DDPM noise, epsilon
    prediction; a transformer that also predicts the variance (2x channels) is trained on the
    epsilon half, as its pipelines read it."""

    names = ("pixart",)

    def load(self, folder: str) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer

        kw = dict(local_files_only=True)
        transformer = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", **kw)
        encoder = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", **kw)
        tokenizer = T5Tokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder, subfolder="scheduler", **kw))
        if self.prediction_type == "auto":
            self.prediction_type = scheduler.config.prediction_type
        return Components(transformer, [encoder], [tokenizer], vae, scheduler)

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L, D), "encoder_attention_mask": (B, L)}"""
        tokenizer = c.tokenizers[0]
        tokens = tokenizer(captions, padding="max_length", max_length=min(tokenizer.model_max_length, 120),
                           truncation=True, return_tensors="pt").to(device)
        mask = tokens.attention_mask
        return {"encoder_hidden_states": c.text_encoders[0](tokens.input_ids, attention_mask=mask)[0],
                "encoder_attention_mask": mask}

    def predict(self, c: Components, noisy, timesteps, cond: dict) -> torch.Tensor:
        out = c.denoiser(noisy, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timesteps,
                         encoder_attention_mask=cond["encoder_attention_mask"],
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out[:, : noisy.shape[1]] if out.shape[1] == 2 * noisy.shape[1] else out

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import DDIMScheduler, PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline(tokenizer=c.tokenizers[0], text_encoder=c.text_encoders[0], vae=c.vae,
                                   transformer=c.denoiser, scheduler=DDIMScheduler.from_config(c.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                        generator=torch.Generator().manual_seed(seed), use_resolution_binning=False,
                        max_sequence_length=min(c.tokenizers[0].model_max_length, 120)).images


class FluxFamily(StableDiffusion3Family):
    """Flux.1: rectified flow like SD3, on 2x2-packed latent tokens with position ids; the
    transformer receives sigma (the network's hook maps it to t = sigma * T). Text: CLIP pooled
    output + T5 tokens. Guidance-distilled models get the guidance embedding at 1.0 in training."""

    names = ("flux",)
    guidance = 1.0

    def load(self, folder: str) -> Components:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        kw = dict(local_files_only=True)
        transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", **kw)
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
                    T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", **kw)]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw),
                      T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_2", **kw)]
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
        return Components(transformer, encoders, tokenizers, vae, scheduler)

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """{"encoder_hidden_states": (B, L5, D5), "pooled_projections": (B, P)}"""
        clip_tok, t5_tok = c.tokenizers
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
        pooled = c.text_encoders[0](ids).pooler_output
        ids = t5_tok(captions, padding="max_length", max_length=min(t5_tok.model_max_length, 512), truncation=True,
                     return_tensors="pt").input_ids.to(device)
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
        out = c.denoiser(hidden_states=tokens, timestep=timesteps.to(noisy.dtype) / self.num_train_timesteps,
                         guidance=guidance, pooled_projections=cond["pooled_projections"],
                         encoder_hidden_states=states, txt_ids=txt_ids, img_ids=img_ids).sample
        # Unpack: (B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of _pack_latents.
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=c.noise_scheduler, vae=c.vae, text_encoder=c.text_encoders[0],
                            tokenizer=c.tokenizers[0], text_encoder_2=c.text_encoders[1], tokenizer_2=c.tokenizers[1],
                            transformer=c.denoiser)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                        generator=torch.Generator().manual_seed(seed),
                        max_sequence_length=min(c.tokenizers[1].model_max_length, 512)).images


TRAINING_FAMILIES = {name: cls for cls in (StableDiffusionFamily, StableDiffusionXLFamily, TextToVideoFamily,
                                           StableDiffusion3Family, PixArtFamily, FluxFamily) for name in cls.names}


def get_training_family(name: str, prediction_type: str = "auto"):
    if name not in TRAINING_FAMILIES:
        raise ValueError(f"unknown family {name!r}; valid: {sorted(TRAINING_FAMILIES)}")
    return TRAINING_FAMILIES[name](prediction_type)
