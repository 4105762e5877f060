"""Timestep intervals (docs/design.md section 1): the one place that maps a timestep to an expert.

``t`` is 0-based on the ``[0, T)`` axis the denoiser receives; it may be fractional (a UI
converting sigma to t) or come from a flow-matching model mapped with ``t = sigma * T``.
A *scale* ``n`` splits ``[0, T)`` into ``n`` equal half-open intervals; the expert of ``t``
is ``clamp(floor(t * n / T), 0, n - 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

DEFAULT_NUM_TRAIN_TIMESTEPS = 1000


def expert_index(t: torch.Tensor | float | int, n: int, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS):
    """Expert of timestep(s) ``t`` at scale ``n``.

    Args:
        t: a number, or a tensor of any shape (int or float) on the 0..T axis.
        n: number of intervals of the scale.
        num_train_timesteps: ``T``.
    Returns:
        An ``int`` for a number; a ``torch.long`` tensor of ``t``'s shape for a tensor.
    """
    _check_scale(n, num_train_timesteps)
    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            # float64 so that boundary values (t = 125.0 for n = 8) never round down.
            idx = torch.floor(t.to(torch.float64) * n / num_train_timesteps).long()
        else:
            idx = torch.div(t.long() * n, num_train_timesteps, rounding_mode="floor")
        return idx.clamp_(0, n - 1)
    return min(max(math.floor(float(t) * n / num_train_timesteps), 0), n - 1)


def interval_bounds(i: int, n: int, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS) -> tuple[float, float]:
    """Half-open interval ``[lo, hi)`` of expert ``i`` at scale ``n`` (may be fractional)."""
    _check_expert(i, n, num_train_timesteps)
    return i * num_train_timesteps / n, (i + 1) * num_train_timesteps / n


def interval_timestep_range(i: int, n: int, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
    """Integer timesteps of expert ``i`` as ``(min_timestep, max_timestep)``, max exclusive.

    This is the form of sd-scripts' ``--min_timestep/--max_timestep`` and of the exported
    ``modelspec.timestep_range``: integers ``t`` with ``lo <= t < hi`` are exactly those whose
    expert is ``i``.
    """
    _check_expert(i, n, num_train_timesteps)
    return -(-i * num_train_timesteps // n), -(-(i + 1) * num_train_timesteps // n)


def parse_scales(value: str | int | Sequence[int]) -> list[int]:
    """Parse ``"8"``, ``"8,1"``, ``8`` or ``[8, 1]`` into a list of distinct positive scales.

    The first scale is the core (finest) one; order is kept as given.
    """
    if isinstance(value, int):
        items: Iterable = [value]
    elif isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    else:
        items = list(value)
    scales = []
    for item in items:
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"tsm_scales: {item!r} is not an integer (expected e.g. '8' or '8,1')") from None
        if n < 1:
            raise ValueError(f"tsm_scales: every scale must be >= 1, got {n}")
        scales.append(n)
    if not scales:
        raise ValueError("tsm_scales: no scale given (expected e.g. '8' or '8,1')")
    if len(set(scales)) != len(scales):
        raise ValueError(f"tsm_scales: scales must be distinct, got {scales}")
    return scales


def _check_scale(n: int, num_train_timesteps: int) -> None:
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"scale n={n} must be in [1, {num_train_timesteps}]")


def _check_expert(i: int, n: int, num_train_timesteps: int) -> None:
    _check_scale(n, num_train_timesteps)
    if not 0 <= i < n:
        raise ValueError(f"expert {i} does not exist at scale n={n} (valid: 0..{n - 1})")
