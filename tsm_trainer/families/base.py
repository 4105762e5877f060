"""What every training family returns when it loads a base model, and the loading rules they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Components:
    """A loaded base model. ``denoiser`` is the UNet/transformer the network is applied to."""

    denoiser: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    vae: nn.Module
    noise_scheduler: object


def load_kwargs(weight_dtype: torch.dtype | None) -> dict:
    """``from_pretrained`` arguments: local files only, and an explicit dtype (float32 unless given) so
    that weights stored in float16 / bfloat16 on disk are upcast instead of kept in their disk dtype."""
    return {"local_files_only": True, "torch_dtype": weight_dtype or torch.float32}


def single_file_components(path: str, family_names: tuple[str, ...], prediction_type: str,
                           weight_dtype: torch.dtype | None, vae_dtype: torch.dtype | None,
                           tokenizer_cache_dir: str | None) -> tuple[Components, str]:
    """(Components, prediction type) of a single-file SD 1.x / 2.x / SDXL checkpoint; the file's family
    must be one of ``family_names``."""
    from tsm_trainer.base_models.loading import BaseModelError
    from tsm_trainer.base_models.single_file import (build_scheduler, build_text_encoder, build_tokenizers, build_unet, build_vae,
                                describe, settle_prediction_type)

    model = describe(path, prediction_type)
    if model.family not in family_names:
        raise BaseModelError(f"{path}: holds an {model.family} model, not {'/'.join(family_names)}")
    dtype = weight_dtype or torch.float32
    unet = build_unet(model, True, dtype)
    settle_prediction_type(model, unet)
    encoders = [build_text_encoder(model, i, True, dtype) for i in range(len(model.text_encoders))]
    components = Components(unet, encoders, build_tokenizers(model, tokenizer_cache_dir),
                            build_vae(model, True, vae_dtype or torch.float32), build_scheduler(model))
    return components, model.prediction_type


def require_folder(path: str, family: str) -> None:
    """Single files are read for SD 1.x / 2.x / SDXL only: stop early for the other families."""
    import os

    if os.path.isfile(path):
        from tsm_trainer.base_models.loading import BaseModelError

        raise BaseModelError(f"{path}: a single file; the {family} family is read from a diffusers folder only "
                             "(model_index.json with transformer/ or unet/, text_encoder/, vae/, scheduler/ ...)")


def note_folder_tokenizer(path: str, tokenizer_cache_dir: str | None) -> None:
    """kohya's --tokenizer_cache_dir serves single files; a diffusers folder brings its own tokenizer(s)."""
    if tokenizer_cache_dir:
        import logging

        logging.getLogger(__name__).warning("--tokenizer_cache_dir %s is not used: %s is a diffusers folder with its "
                                            "own tokenizer(s)", tokenizer_cache_dir, path)
