"""Local base models: a diffusers folder or a single-file checkpoint, loaded without touching a hub.

``load_components(path, weights=False)`` builds the denoiser and text encoders from their
configs on the meta device (instant, no memory): enough to resolve LoRA key names and check
LoRA shapes. With ``weights=True`` the real weights are loaded (optionally as ``torch_dtype``).

``path`` may be
  * a pipeline folder: ``model_index.json`` naming ``unet``/``transformer``/``prior`` and
    ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``, each a subfolder;
  * a folder with only ``unet/`` or ``transformer/`` (and optionally ``text_encoder*/``)
    subfolders holding a ``config.json``, and no ``model_index.json``;
  * a bare model folder whose ``config.json`` names a diffusers denoiser class;
  * a single-file SD 1.x / 2.x / SDXL checkpoint (``.safetensors``, or ``.ckpt`` through torch's
    weights_only loader) in the LDM / SGM layout: see :mod:`tsm_trainer.base_models.single_file`.

diffusers/transformers are imported only when a component is built.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
from torch import nn

DENOISER_COMPONENTS = ("unet", "transformer", "prior")
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class BaseModelError(ValueError):
    """A base model folder that can't be read; the message names the file or folder."""


def load_components(
    path: str, weights: bool = False, torch_dtype: torch.dtype | None = None
) -> tuple[str, nn.Module, list[tuple[str, nn.Module | None]]]:
    """(denoiser component name, denoiser, [(text encoder component name, module or None), ...]).

    Text encoders keep their pipeline positions (a missing one is None; trailing ones are
    dropped): the positions decide the kohya ``lora_te``/``lora_te1``/... prefixes.

    Args:
        path: a local diffusers folder or single-file checkpoint (see the module docstring); nothing
            is downloaded.
        weights: load the weights (slow); otherwise build from configs on the meta device.
        torch_dtype: the dtype to load the weights in (``weights=True`` only).
    Raises:
        BaseModelError: naming the folder or file and what is missing or unreadable.
    """
    if os.path.isfile(path):
        return _single_file_components(path, weights, torch_dtype)
    if not os.path.isdir(path):
        raise BaseModelError(
            f"{path}: not a folder or a checkpoint file (give a local diffusers model folder: "
            "model_index.json with unet/ or transformer/, text_encoder/ ...; or a single-file "
            ".safetensors checkpoint)"
        )
    specs = _component_classes(path)
    if not any(n in specs for n in DENOISER_COMPONENTS):
        bare = _class_from_config(path)
        if bare is not None and bare[0] == "diffusers":
            name = "transformer" if "Transformer" in bare[1] else "unet"
            return name, _build(path, bare, weights, torch_dtype), []
        why = (
            "model_index.json names no unet/, transformer/ or prior/ subfolder"
            if os.path.isfile(os.path.join(path, "model_index.json"))
            else "not a diffusers pipeline folder (no model_index.json), and no unet/ or transformer/ subfolder "
            "with a config.json"
        )
        raise BaseModelError(f"{path}: no unet or transformer found: {why}")
    name = next(n for n in DENOISER_COMPONENTS if n in specs)
    denoiser = _build(os.path.join(path, name), specs[name], weights, torch_dtype)
    encoders = [
        (c, _build(os.path.join(path, c), specs[c], weights, torch_dtype) if c in specs else None)
        for c in TEXT_ENCODER_COMPONENTS
    ]
    while encoders and encoders[-1][1] is None:
        encoders.pop()
    return name, denoiser, encoders


def load_base_model(
    path: str, weights: bool = False, torch_dtype: torch.dtype | None = None
) -> tuple[nn.Module, list[nn.Module | None]]:
    """(denoiser, [text_encoder, text_encoder_2, ...]) of :func:`load_components`, without the names."""
    _, denoiser, encoders = load_components(path, weights, torch_dtype)
    return denoiser, [m for _, m in encoders]


def _single_file_components(path: str, weights: bool, torch_dtype: torch.dtype | None):
    from tsm_trainer.base_models.single_file import build_text_encoder, build_unet, describe

    model = describe(path)
    dtype = torch_dtype or torch.float32
    encoders = [
        (name, build_text_encoder(model, i, weights, dtype))
        for i, name in enumerate(TEXT_ENCODER_COMPONENTS[: len(model.text_encoders)])
    ]
    return "unet", build_unet(model, weights, dtype), encoders


def frozen_weight_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """dtype of the frozen UNet / text encoders, kohya's rule: float32 on CPU (CPU kernels are slow or
    missing in half precision, and autocast runs there in bfloat16 anyway); on CUDA the mixed-precision
    dtype ("fp16" / "bf16"), which halves their memory. The VAE stays float32 unless stated."""
    if torch.device(device).type != "cuda" or mixed_precision in ("no", "", None):
        return torch.float32
    if mixed_precision not in ("fp16", "bf16"):
        raise ValueError(f"--mixed_precision {mixed_precision!r}: expected no, fp16 or bf16")
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def _component_classes(path: str) -> dict[str, tuple[str, str]]:
    """``{component: (library, class name)}`` of the denoiser and text encoders that have a subfolder."""
    index_path = os.path.join(path, "model_index.json")
    wanted = (*DENOISER_COMPONENTS, *TEXT_ENCODER_COMPONENTS)
    if not os.path.isfile(index_path):
        found = {n: _class_from_config(os.path.join(path, n)) for n in wanted}
        return {n: cls for n, cls in found.items() if cls is not None}
    index = _read_json(index_path)
    specs = {}
    for name in wanted:
        value = index.get(name)
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and value[0]
            and value[1]
            and os.path.isdir(os.path.join(path, name))
        ):
            specs[name] = (str(value[0]), str(value[1]))
    return specs


def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"{file}: not a JSON object")
    return data


def _class_from_config(folder: str) -> tuple[str, str] | None:
    cfg = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg):
        return None
    config = _read_json(cfg)
    if config.get("_class_name"):
        return "diffusers", str(config["_class_name"])
    if config.get("architectures"):
        return "transformers", str(config["architectures"][0])
    return None


def _build(where: str, library_class: tuple[str, str], weights: bool, torch_dtype: torch.dtype | None) -> nn.Module:
    library, cls_name = library_class
    if library not in ("diffusers", "transformers"):
        raise BaseModelError(f"{where}: component class {library}.{cls_name} is not a diffusers/transformers model")
    try:
        cls = getattr(importlib.import_module(library), cls_name)
    except (ImportError, AttributeError) as e:
        raise BaseModelError(f"{where}: cannot import {library}.{cls_name} ({e})") from None
    try:
        if weights:
            kwargs: dict[str, Any] = {"local_files_only": True}
            if torch_dtype is not None:
                kwargs["torch_dtype"] = torch_dtype
            model = cls.from_pretrained(where, **kwargs)
        else:
            with torch.device("meta"):
                if library == "diffusers":
                    model = cls.from_config(cls.load_config(where))
                else:
                    from transformers import AutoConfig

                    model = cls(AutoConfig.from_pretrained(where, local_files_only=True))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise BaseModelError(f"{where}: cannot load {cls_name} ({type(e).__name__}: {first})") from None
    return model.eval()
