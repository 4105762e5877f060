"""The few-step student of distillation (DMD2-style): its timesteps, x0 from a denoiser output,
and backward simulation (run the student from pure noise to the step being trained).

Sampling the student is the same chain: at each of its k timesteps, predict x0, then re-noise x0 to
the next timestep with fresh noise; the last x0 is the image (diffusers' ``LCMScheduler`` with
``timesteps=`` does exactly this, which is how the student runs in diffusers pipelines and UIs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def default_student_timesteps(k: int, num_train_timesteps: int = 1000) -> list[int]:
    """``k`` evenly spaced timesteps from T - 1 down: k = 4, T = 1000 -> [999, 749, 499, 249] (the paper's)."""
    if k < 1:
        raise ValueError(f"a student needs at least one step, got {k}")
    return [num_train_timesteps - 1 - i * num_train_timesteps // k for i in range(k)]


def parse_student_timesteps(text: str, num_train_timesteps: int = 1000) -> list[int]:
    """``"999,749,499,249"`` or ``"4"`` (that many evenly spaced) -> descending timesteps.

    Raises:
        ValueError: not integers, not strictly descending, or outside [0, T).
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--distill_timesteps {text!r}: expected a step count or comma-separated timesteps") from None
    if len(values) == 1 and "," not in text:
        return default_student_timesteps(values[0], num_train_timesteps)
    if (
        not values
        or any(a <= b for a, b in zip(values, values[1:]))
        or values[0] >= num_train_timesteps
        or values[-1] < 0
    ):
        raise ValueError(
            f"--distill_timesteps {text!r}: timesteps must be strictly descending within [0, {num_train_timesteps})"
        )
    return values


def alphas_at(noise_scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha-bar of each sample's t, shaped to broadcast against ``like`` (B, ...)."""
    a = noise_scheduler.alphas_cumprod.to(like.device, torch.float32)[t.long().to(like.device)]
    return a.view(-1, *([1] * (like.dim() - 1)))


def predict_x0(
    prediction_type: str, noise_scheduler, noisy: torch.Tensor, t: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """Clean-latent estimate from a denoiser ``output`` (epsilon or v) at ``t``; shapes as ``noisy``."""
    a = alphas_at(noise_scheduler, t, noisy)
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * output.float()
    return (noisy - (1 - a).sqrt() * output.float()) / a.sqrt()


def renoise(noise_scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = alphas_at(noise_scheduler, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def simulate_to(
    student_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise_scheduler,
    timesteps: Sequence[int],
    step_index: torch.Tensor,
    shape: tuple,
    generator: torch.Generator,
    device,
) -> torch.Tensor:
    """Each sample's input at its student step (backward simulation, no grad): start from noise at
    ``timesteps[0]``, then for j < step_index[b] predict x0 and re-noise it to ``timesteps[j + 1]``.

    Args:
        student_x0: ``(noisy (B, C, h, w), t (B,)) -> x0 (B, C, h, w)``.
        step_index: (B,) long, which student step each sample is trained at.
    Returns:
        (B, C, h, w) noisy latents at ``timesteps[step_index[b]]``.
    """
    z = torch.randn(shape, generator=generator).to(device)
    for j in range(int(step_index.max()) if len(step_index) else 0):
        active = (step_index > j).to(device)
        t = torch.full((shape[0],), timesteps[j], dtype=torch.long, device=device)
        x0 = student_x0(z, t)
        nxt = renoise(
            noise_scheduler,
            x0,
            torch.randn(shape, generator=generator).to(device),
            torch.full_like(t, timesteps[j + 1]),
        )
        z = torch.where(active.view(-1, *([1] * (z.dim() - 1))), nxt, z)
    return z


@torch.no_grad()
def sample_latents(
    student_x0, noise_scheduler, timesteps: Sequence[int], shape: tuple, generator: torch.Generator, device
) -> torch.Tensor:
    """The student's k-step sample: clean latents (B, C, h, w)."""
    last = torch.full((shape[0],), len(timesteps) - 1, dtype=torch.long)
    z = simulate_to(student_x0, noise_scheduler, timesteps, last, shape, generator, device)
    return student_x0(z, torch.full((shape[0],), timesteps[-1], dtype=torch.long, device=device))
