"""The discrete SD noise schedule in float32, as ComfyUI's ``ModelSamplingDiscrete``
(comfy/model_sampling.py) and Forge's ``Prediction`` (backend/modules/k_prediction.py) hold it.

The ComfyUI workflow generator needs it bit for bit: which side of a hook keyframe a sigma falls on,
and which integer t the UNet gets for it, are decided by float32 rounding at the boundaries.
Checked against ComfyUI's real class in tests/test_ext_comfyui_real.py."""

import torch
from torch import nn


class DiscreteSigmas(nn.Module):
    """Scaled-linear betas (linspace of sqrt, squared, float64), sigmas from alphas_cumprod;
    ``timestep(sigma)`` = nearest index in log-sigma, ``sigma(t)`` interpolates log-sigma."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000):
        super().__init__()
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.num_timesteps = timesteps
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp().to(timestep.device)
