"""Model families of the trainer: how to load a base model, encode text and images, add
noise and form the training target. Registered in one place: ``TRAINING_FAMILIES``.
"""

from __future__ import annotations

from tsm_trainer.families.base import Components
from tsm_trainer.families.flux import FluxFamily
from tsm_trainer.families.pixart import PixArtFamily
from tsm_trainer.families.sd import StableDiffusionFamily
from tsm_trainer.families.sd3 import StableDiffusion3Family
from tsm_trainer.families.sdxl import StableDiffusionXLFamily
from tsm_trainer.families.video import TextToVideoFamily

TRAINING_FAMILIES = {name: cls for cls in (StableDiffusionFamily, StableDiffusionXLFamily, TextToVideoFamily,
                                           StableDiffusion3Family, PixArtFamily, FluxFamily) for name in cls.names}


def get_training_family(name: str, prediction_type: str = "auto"):
    if name not in TRAINING_FAMILIES:
        raise ValueError(f"unknown family {name!r}; valid: {sorted(TRAINING_FAMILIES)}")
    return TRAINING_FAMILIES[name](prediction_type)


__all__ = ["Components", "FluxFamily", "PixArtFamily", "StableDiffusion3Family", "StableDiffusionFamily",
           "StableDiffusionXLFamily", "TRAINING_FAMILIES", "TextToVideoFamily", "get_training_family"]
