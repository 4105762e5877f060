"""DMD2's objective pieces (Yin et al. 2024, "Improved Distribution Matching Distillation"):
distribution matching from a frozen teacher ("real") score and an online "fake" score, the fake
score's own denoising loss, and a light GAN head on the fake score model's bottleneck features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distribution_matching_loss(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient w.r.t. ``x0`` is DMD's: (fake - real) normalised per sample by the mean
    |x0 - real| (DMD2 eq. 2 with its weighting). ``real_x0`` / ``fake_x0`` are the two score models'
    x0 estimates of the re-noised ``x0`` (no grad). All (B, C, h, w)."""
    with torch.no_grad():
        dims = tuple(range(1, x0.dim()))
        norm = (x0 - real_x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-6)
        grad = torch.nan_to_num((fake_x0 - real_x0) / norm)
        target = x0 - grad
    # d/dx0 of 0.5 * sum((x0 - target)^2) / B is grad / B per element: mean over the batch, sum inside
    return 0.5 * F.mse_loss(x0.float(), target.float(), reduction="sum") / x0.shape[0]


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-D(fake)), (B,) -> scalar."""
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


class DiscriminatorHead(nn.Module):
    """A light classifier on the fake score model's mid-block features: (B, C, h, w) -> (B,) logits."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        groups = max(1, min(groups, channels))
        while channels % groups:
            groups -= 1
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).mean(dim=(1, 2, 3))


class FeatureTap:
    """Keeps the last output of ``module`` (e.g. ``unet.mid_block``) while installed."""

    def __init__(self, module: nn.Module):
        self.features: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.features = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        self._handle.remove()
