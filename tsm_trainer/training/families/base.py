"""What every training family returns when it loads a base model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

@dataclass
class Components:
    """A loaded base model. ``denoiser`` is the UNet/transformer the network is applied to."""

    denoiser: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    vae: nn.Module
    noise_scheduler: object
