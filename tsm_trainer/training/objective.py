"""The denoising objective, shared by training, validation and evaluation (one definition, so a
validation or evaluation loss is exactly the training loss at the same draw)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from tsm_trainer.core.intervals import interval_timestep_range
from tsm_trainer.data.cache import TextEncoderCache


def denoising_loss(
    family,
    components,
    batch: dict,
    timesteps: torch.Tensor,
    generator: torch.Generator,
    encode_text: Callable[[list[str]], dict],
    device,
    noise_offset: float = 0.0,
    autocast=nullcontext,
) -> torch.Tensor:
    """Per-sample loss (B,) of ``batch`` ({"latents" (B, C, h, w) or "pixels" (B, 3, H, W), "captions"}) at
    ``timesteps`` (B,). Latent sampling and noise come from ``generator`` (CPU) in a fixed order, so the
    same generator state gives the same draw on any device and for any network applied."""
    if "latents" in batch:  # cached by the data layer
        latents = batch["latents"].to(device).float()
    else:
        with torch.no_grad():
            latents = family.encode_images(components, batch["pixels"].to(device), generator).float()
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[:2] + (1,) * (latents.dim() - 2), generator=generator)
    noise, timesteps = noise.to(device), timesteps.to(device)
    with autocast():
        cond = encode_text(batch["captions"])
        noisy, target = family.noisy_input_and_target(components, latents, noise, timesteps)
        pred = family.predict(components, noisy, timesteps, cond)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))


def frozen_text_cache(family, components, device) -> TextEncoderCache:
    """An in-memory cache of ``family.encode_text`` for a frozen text encoder (on ``device``)."""
    return TextEncoderCache(lambda captions: family.encode_text(components, captions, device))


def draw_timesteps(family, lo: int, hi: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) timesteps in [lo, hi) with the family's density (uniform integers unless the family
    defines ``draw_timesteps``, e.g. SD3's logit-normal)."""
    if hasattr(family, "draw_timesteps"):
        return family.draw_timesteps(lo, hi, n, generator)
    return torch.randint(lo, hi, (n,), generator=generator)


@torch.no_grad()
def loss_by_interval(
    loss_fn: Callable[[dict, torch.Tensor, torch.Generator], torch.Tensor],
    batches: Iterable[dict],
    family,
    num_train_timesteps: int,
    bins: int,
    seed: int = 1234,
) -> list[float]:
    """Mean held-out loss in each of ``bins`` equal intervals of t: every batch is evaluated once per
    interval with t drawn inside it. The draw (latent sampling, noise, t) depends only on ``seed``, the
    batches and ``bins``, never on the network, so every model compared sees the same one."""
    totals, counts = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        n = len(batch["captions"])
        for i in range(bins):
            lo, hi = interval_timestep_range(i, bins, num_train_timesteps)
            t = draw_timesteps(family, lo, hi, n, generator)
            totals[i] += loss_fn(batch, t, generator).double().sum().cpu()
            counts[i] += n
    return (totals / counts.clamp(min=1)).tolist()
