"""The model families, registered in one place: :data:`FAMILY_CLASSES`.

Each family is one module (``sd.py`` holds SD 1.x and 2.x) declaring a :class:`FamilySpec` per
family and the training class that uses it (docs/design.md section 9). Everything that asks "which
family" asks this registry: the core (targets, key naming, sigma-input denoisers), ``--family``,
folder and file detection, family guessing, bake, the Forge adapter.

Every function takes ``families=None`` (the registry): a caller or a test can pass another tuple of
training classes; there is no import-time self-registration and no mutable global.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from tsm_trainer.families.base import Components, FamilySpec, TrainingFamily
from tsm_trainer.families.flux import FluxFamily
from tsm_trainer.families.pixart import PixArtFamily
from tsm_trainer.families.sd import StableDiffusionFamily
from tsm_trainer.families.sd3 import StableDiffusion3Family
from tsm_trainer.families.sdxl import StableDiffusionXLFamily
from tsm_trainer.families.video import TextToVideoFamily

# Specific before general: metadata needles are tried in this order ("xl" before SD 1.x's "v1").
FAMILY_CLASSES: tuple[type, ...] = (
    StableDiffusionXLFamily,
    StableDiffusion3Family,
    FluxFamily,
    PixArtFamily,
    TextToVideoFamily,
    StableDiffusionFamily,
)

# Folders a diffusers model keeps its denoiser config in.
DENOISER_FOLDERS = ("unet", "transformer")


def _classes(families: Iterable[type] | None) -> tuple[type, ...]:
    return FAMILY_CLASSES if families is None else tuple(families)


def family_specs(families: Iterable[type] | None = None) -> tuple[FamilySpec, ...]:
    """Every registered spec, in registry order."""
    return tuple(spec for cls in _classes(families) for spec in cls.specs)


def family_names(families: Iterable[type] | None = None) -> tuple[str, ...]:
    """Sorted family names (the ``--family`` choices besides ``auto``)."""
    return tuple(sorted(spec.name for spec in family_specs(families)))


def get_family(name: str, families: Iterable[type] | None = None) -> FamilySpec:
    """The spec named ``name``; ValueError listing the valid names otherwise."""
    for spec in family_specs(families):
        if spec.name == name:
            return spec
    raise ValueError(f"unknown family {name!r}; valid: {list(family_names(families))}")


def training_class(name: str, families: Iterable[type] | None = None) -> type:
    """The training class of family ``name`` (one class may train several, e.g. sd1 and sd2)."""
    for cls in _classes(families):
        if any(spec.name == name for spec in cls.specs):
            return cls
    raise ValueError(f"unknown family {name!r}; valid: {list(family_names(families))}")


def get_training_family(
    name: str, prediction_type: str = "auto", families: Iterable[type] | None = None
) -> TrainingFamily:
    """A training family instance for family ``name``."""
    return training_class(name, families)(prediction_type)


def unwrap_denoiser(denoiser):
    """The nn.Module behind sd-scripts' inference wrappers (``InferUNet2DConditionModel``,
    ``InferSdxlUNet2DConditionModel`` hold it as ``delegate``)."""
    while not isinstance(denoiser, nn.Module) and hasattr(denoiser, "delegate"):
        denoiser = denoiser.delegate
    return denoiser


def _config_getter(config: Any):
    if config is None:
        return lambda key: None
    if isinstance(config, dict):
        return config.get
    return lambda key: getattr(config, key, None)


def _claimant(class_name: str, get, denoiser: nn.Module | None, families) -> FamilySpec | None:
    return next((spec for spec in family_specs(families) if spec.claims(class_name, get, denoiser)), None)


def _supported_classes(families) -> str:
    specs = family_specs(families)
    return ", ".join(sorted({c for spec in specs for c in spec.denoiser_classes + spec.config_classes}))


def detect_family(denoiser: nn.Module, families: Iterable[type] | None = None) -> FamilySpec:
    """The family of a denoiser (diffusers or sd-scripts class), from its class name and config."""
    denoiser = unwrap_denoiser(denoiser)
    cls = type(denoiser).__name__
    spec = _claimant(cls, _config_getter(getattr(denoiser, "config", None)), denoiser, families)
    if spec is None:
        raise ValueError(f"unknown denoiser class {cls}: supported are {_supported_classes(families)}")
    return spec


def detect_folder_family(path: str, families: Iterable[type] | None = None) -> FamilySpec:
    """The family of a diffusers folder from ``unet/config.json`` or ``transformer/config.json`` (its
    ``_class_name`` and config; no weights, no model is built), or of a single-file checkpoint from its
    key names and shapes (the header only)."""
    from tsm_trainer.base_models.loading import BaseModelError

    if os.path.isfile(path):
        from tsm_trainer.base_models.single_file import describe

        return get_family(describe(path, "auto").family, families)
    if not os.path.isdir(path):
        raise BaseModelError(
            f"{path}: no such file or folder (expected a diffusers folder or a single-file .safetensors checkpoint)"
        )
    for sub in DENOISER_FOLDERS:
        config_path = os.path.join(path, sub, "config.json")
        if not os.path.isfile(config_path):
            continue
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise BaseModelError(f"{config_path}: not readable JSON ({e})") from None
        cls = str(config.get("_class_name", "")) if isinstance(config, dict) else ""
        spec = _claimant(cls, _config_getter(config if isinstance(config, dict) else None), None, families)
        if spec is None:
            raise BaseModelError(
                f"{config_path}: unknown denoiser class {cls or '(no _class_name)'}: supported are "
                f"{_supported_classes(families)}"
            )
        return spec
    raise BaseModelError(f"{path}: no unet/config.json or transformer/config.json: not a diffusers model folder")


__all__ = [
    "Components",
    "FAMILY_CLASSES",
    "FamilySpec",
    "FluxFamily",
    "PixArtFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "TextToVideoFamily",
    "TrainingFamily",
    "detect_family",
    "detect_folder_family",
    "family_names",
    "family_specs",
    "get_family",
    "get_training_family",
    "training_class",
    "unwrap_denoiser",
]
