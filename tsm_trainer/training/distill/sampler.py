"""Sampling a distilled student: k steps at its trained timesteps, no classifier-free guidance.

Equivalent to a diffusers pipeline with ``LCMScheduler`` and ``timesteps=[999, 749, 499, 249]``
(tested): that is how to run a student file in diffusers, and in UIs use an LCM sampler at the
same timesteps with the TSM extension switching the expert per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tsm_trainer.training.distill.student import predict_x0, sample_latents


@torch.no_grad()
def sample_student(
    family,
    components,
    prompts: Sequence[str],
    timesteps: Sequence[int],
    size: int,
    seed: int,
    latents_only: bool = False,
):
    """PIL images (or clean latents (B, C, size/f, size/f) with ``latents_only``) of ``prompts`` from
    whatever network is applied to the denoiser, run as a ``len(timesteps)``-step student."""
    device = next(components.denoiser.parameters()).device
    cond = family.encode_text(components, list(prompts), device)
    factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
    shape = (len(prompts), components.denoiser.config.in_channels, size // factor, size // factor)
    generator = torch.Generator().manual_seed(seed)

    def student_x0(noisy, t):
        out = family.predict(components, noisy, t, cond)
        return predict_x0(family.prediction_type, components.noise_scheduler, noisy, t, out)

    latents = sample_latents(student_x0, components.noise_scheduler, list(timesteps), shape, generator, device)
    if latents_only:
        return latents
    images = components.vae.decode(latents / components.vae.config.scaling_factor).sample
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().postprocess(images.float(), output_type="pil")
