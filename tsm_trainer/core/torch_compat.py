"""Torch APIs whose signature changed within the supported range (torch >= 2.1: A1111 v1.10 ships 2.1.2)."""

from __future__ import annotations

import torch


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, which exists from torch 2.4; before it, CPU autocast
    has its own query and the argument-less form means CUDA."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: "is_autocast_enabled() takes 0 positional arguments"
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
