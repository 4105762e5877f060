"""Which model a single-file checkpoint holds, from its key names (the LDM / SGM layouts that
A1111 and sd-scripts read), and the prediction type it records.

SD 1.x: UNet ``model.diffusion_model.*``, CLIP-L ``cond_stage_model.transformer.*``.
SD 2.x: the same UNet layout, OpenCLIP ``cond_stage_model.model.*``.
SDXL:   UNet with ``label_emb``, ``conditioner.embedders.0.transformer.*`` (CLIP-L) and
        ``conditioner.embedders.1.model.*`` (OpenCLIP bigG).
VAE:    ``first_stage_model.*`` in all three.
Anything else stops with a :class:`BaseModelError` naming the keys that identified it.
"""

from __future__ import annotations

import os
import re

from tsm_trainer.base_models.loading import BaseModelError
from tsm_trainer.base_models.single_file.reader import CheckpointFile
from tsm_trainer.families import family_specs

UNET = "model.diffusion_model."
VAE = "first_stage_model."
FOLDER_HINT = "convert it to a diffusers folder (diffusers' from_single_file + save_pretrained) and pass the folder"


def other_families() -> tuple[tuple[str, str], ...]:
    """(what, key fragment) of the families this trainer reads only from a diffusers folder (the family
    specs' ``single_file_refusal``)."""
    return tuple(spec.single_file_refusal for spec in family_specs() if spec.single_file_refusal)


def _find(ckpt: CheckpointFile, fragment: str) -> str | None:
    return next((k for k in ckpt.shapes if fragment in k), None)


def identify(ckpt: CheckpointFile) -> str:
    """ "sd1", "sd2" or "sdxl". Raises BaseModelError naming what was found for anything else."""
    keys = ckpt.shapes
    path = ckpt.path
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        raise BaseModelError(
            f"{path}: this is a LoRA (keys like '{next(k for k in keys if k.startswith('lora_'))}'), not a base model"
        )
    for what, fragment in other_families():
        key = _find(ckpt, fragment)
        if key is not None:
            raise BaseModelError(
                f"{path}: a {what} single-file checkpoint (key '{key}'); single files are read for "
                f"SD 1.x, SD 2.x and SDXL only: {FOLDER_HINT}"
            )
    if not any(k.startswith(UNET + "input_blocks.") for k in keys):
        sample = ", ".join(f"'{k}'" for k in sorted(keys)[:3])
        diffusers = any(k.startswith(("down_blocks.", "conv_in.")) for k in keys)
        why = (
            "diffusers-layout weights of one component (a model.safetensors from a diffusers folder): pass the "
            "whole diffusers folder"
            if diffusers
            else f"unknown layout (first keys: {sample})"
        )
        raise BaseModelError(f"{path}: no SD UNet under '{UNET}input_blocks.*': {why}")
    if ckpt.shapes.get(UNET + "input_blocks.0.0.weight", (0, 4))[1] != 4:
        channels = ckpt.shapes[UNET + "input_blocks.0.0.weight"][1]
        raise BaseModelError(
            f"{path}: the UNet takes {channels} input channels (an inpainting or other "
            "conditioned model); only text-to-image models with 4 latent channels are trained"
        )
    if not any(k.startswith(VAE) for k in keys):
        raise BaseModelError(
            f"{path}: holds a UNet but no VAE ('{VAE}*'): a UNet-only file; use a full checkpoint or a diffusers folder"
        )
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise BaseModelError(
                f"{path}: SDXL text encoder 2 without text encoder 1 ('conditioner.embedders.0.transformer.*' missing)"
            )
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise BaseModelError(
            f"{path}: an SDXL refiner (one OpenCLIP text encoder under 'conditioner.embedders.0."
            "model.'); only SDXL base models are trained"
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise BaseModelError(
        f"{path}: an SD UNet without a text encoder (no 'cond_stage_model.*' or "
        "'conditioner.embedders.*' keys); use a full checkpoint or a diffusers folder"
    )


def recorded_prediction_type(ckpt: CheckpointFile) -> tuple[str, str] | None:
    """("epsilon" | "v_prediction", where it was found), from what the file or its neighbours record:
    sd-scripts' ``modelspec.prediction_type`` metadata, ComfyUI's ``v_pred`` key, or A1111's
    ``<name>.yaml`` next to the file (``parameterization: "v"``). None when nothing is recorded."""
    spec = ckpt.metadata.get("modelspec.prediction_type")
    if spec in ("v", "epsilon"):
        return ("v_prediction" if spec == "v" else "epsilon"), "metadata modelspec.prediction_type"
    if "v_pred" in ckpt.shapes:
        return "v_prediction", "key 'v_pred'"
    yaml_path = os.path.splitext(ckpt.path)[0] + ".yaml"
    if os.path.isfile(yaml_path):
        with open(yaml_path, encoding="utf-8", errors="replace") as f:
            match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", f.read(), re.MULTILINE)
        if match:
            value = match.group(1)
            if value not in ("v", "eps"):
                raise BaseModelError(f'{yaml_path}: parameterization {value!r} is neither "v" nor "eps"')
            return ("v_prediction" if value == "v" else "epsilon"), yaml_path
    return None
