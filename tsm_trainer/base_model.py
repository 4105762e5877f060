"""Local base models: a diffusers pipeline folder, loaded without touching a hub.

``load_components(folder, weights=False)`` builds the denoiser and text encoders from their
configs on the meta device (instant, no memory): enough to resolve LoRA key names. With
``weights=True`` the real weights are loaded.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

DENOISER_COMPONENTS = ("unet", "transformer")
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class BaseModelError(ValueError):
    """A base model folder that can't be read."""


def load_components(folder: str, weights: bool = False) -> tuple[str, nn.Module, list[tuple[str, nn.Module | None]]]:
    """(denoiser component name, denoiser, [(text encoder component name, module or None), ...]).

    Args:
        folder: a diffusers pipeline folder (``model_index.json`` with ``unet/`` or
            ``transformer/`` and ``text_encoder*/`` subfolders).
        weights: load the weights (slow); otherwise build from configs on the meta device.
    Raises:
        BaseModelError: naming the folder and what is missing.
    """
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise BaseModelError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    with open(index_path) as f:
        index = json.load(f)
    name = next((c for c in DENOISER_COMPONENTS if c in index and os.path.isdir(os.path.join(folder, c))), None)
    if name is None:
        raise BaseModelError(f"{folder}: model_index.json names no unet/ or transformer/ subfolder")
    denoiser = _load(folder, name, index[name], weights)
    encoders = [(c, _load(folder, c, index[c], weights) if c in index and index[c][0] is not None
                 and os.path.isdir(os.path.join(folder, c)) else None) for c in TEXT_ENCODER_COMPONENTS]
    while encoders and encoders[-1][1] is None:
        encoders.pop()
    return name, denoiser, encoders


def _load(folder: str, component: str, spec, weights: bool) -> nn.Module:
    library, class_name = spec
    try:
        module = __import__(library, fromlist=[class_name])
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        raise BaseModelError(f"{folder}/{component}: cannot import {library}.{class_name} ({e})") from None
    path = os.path.join(folder, component)
    try:
        if weights:
            return cls.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            if library == "diffusers":
                return cls.from_config(cls.load_config(path))
            from transformers import AutoConfig

            return cls(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, TypeError) as e:
        raise BaseModelError(f"{path}: cannot load {class_name} ({e})") from None
