"""The assembling-stage router (docs/design.md section 2, paper eq. 5-6).

``g = FC(pool(x)) + E[floor(t)]``: a linear map of the pooled module input plus a learned
per-timestep row. Both start at zero and no activation is applied, so assembling starts
exactly at core-only and learns from there.
"""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """Gates of the gated experts of one module.

    Args:
        in_features: k, the channels of the module input.
        num_gates: number of gated scales (m - 1 asymmetric, m symmetric).
        num_train_timesteps: T, rows of the embedding table.
    """

    def __init__(self, in_features: int, num_gates: int, num_train_timesteps: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_gates)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.embedding = nn.Parameter(torch.zeros(num_train_timesteps, num_gates))

    def forward(self, pooled: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pooled: (B, k) module input averaged over all but batch and channel dims.
            t_index: (B,) long, ``floor(t)`` in [0, T).
        Returns:
            (B, num_gates) gates.
        """
        return self.fc(pooled.to(self.fc.weight.dtype)) + self.embedding[t_index]


def pool_input(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Mean over every dimension but batch (0) and ``channel_dim``: (B, ..., k) -> (B, k)."""
    if x.dim() == 2:
        return x
    dims = [d for d in range(1, x.dim()) if d != channel_dim % x.dim()]
    return x.mean(dim=dims)
