"""Building diffusers / transformers modules from a single-file SD 1.x / 2.x / SDXL checkpoint.

Key conversion is diffusers' own (``diffusers.loaders.single_file_utils``: the functions its
``from_single_file`` uses); the configs come from :mod:`.architecture`, so nothing is fetched.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tsm_trainer.base_models.loading import BaseModelError
from tsm_trainer.base_models.single_file.architecture import text_encoder_config, unet_config, vae_config
from tsm_trainer.base_models.single_file.layout import UNET, VAE, identify, recorded_prediction_type
from tsm_trainer.base_models.single_file.reader import CheckpointFile

logger = logging.getLogger(__name__)
CONFIGS = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class SingleFileModel:
    """What a checkpoint holds, read from its header: family ("sd1", "sd2", "sdxl"), prediction type
    ("epsilon" | "v_prediction") and ``prediction_source`` (where that came from), and the configs."""

    path: str
    family: str
    prediction_type: str
    prediction_source: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]]
    settings: dict[str, Any] = field(repr=False)
    file: CheckpointFile = field(repr=False)


def settings(family: str) -> dict[str, Any]:
    """The shipped full-size settings of a family (``configs/<family>.json``)."""
    with open(os.path.join(CONFIGS, f"{family}.json"), encoding="utf-8") as f:
        return json.load(f)


def describe(path: str, prediction_type: str = "auto") -> SingleFileModel:
    """Identify the checkpoint and derive every config from its header (no tensor is read for
    .safetensors). ``prediction_type`` "auto" takes what the file records (see
    ``layout.recorded_prediction_type``), else epsilon; an explicit value wins over the record."""
    if prediction_type not in ("auto", "epsilon", "v_prediction"):
        raise BaseModelError(f"prediction type {prediction_type!r} is not auto, epsilon or v_prediction")
    return describe_checkpoint(CheckpointFile(path), prediction_type)


def describe_checkpoint(ckpt: CheckpointFile, prediction_type: str = "auto") -> SingleFileModel:
    """:func:`describe` of an opened file (or anything with ``path``, ``shapes`` and ``metadata``)."""
    path = ckpt.path
    family = identify(ckpt)
    cfg = settings(family)
    recorded = recorded_prediction_type(ckpt)
    if prediction_type != "auto":
        source = "given"
        if recorded and recorded[0] != prediction_type:
            logger.warning(
                "%s: training as %s as given, but %s says %s", path, prediction_type, recorded[1], recorded[0]
            )
    elif recorded:
        prediction_type, source = recorded
    else:
        prediction_type, source = "epsilon", "default"  # SD 2.x: see settle_prediction_type
    encoders = [text_encoder_config(ckpt.shapes, te, path) for te in cfg["text_encoders"]]
    pooled = encoders[-1]["projection_dim"] if family == "sdxl" else None
    unet = unet_config(ckpt.shapes, cfg["unet"], path, pooled, prediction_type == "v_prediction")
    width = sum(e["hidden_size"] for e in encoders)
    if unet["cross_attention_dim"] != width:
        raise BaseModelError(
            f"{path}: the UNet attends to {unet['cross_attention_dim']}-wide text, the text "
            f"encoder(s) give {width}: the file mixes parts of different models"
        )
    return SingleFileModel(
        path, family, prediction_type, source, unet, vae_config(ckpt.shapes, cfg["vae"], path), encoders, cfg, ckpt
    )


def _instantiate(cls, config, weights: bool):
    if weights:
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on meta, filled below; buffers real
            return cls(config) if not isinstance(config, dict) else cls(**config)
    with torch.device("meta"):
        return cls(config) if not isinstance(config, dict) else cls(**config)


def _assign(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str, path: str) -> nn.Module:
    """Load ``state`` (converted keys) into ``model`` built with empty weights, cast to ``dtype``."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer, recomputed
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
        raise BaseModelError(f"{path}: the {what} does not match the SD layout ({'; '.join(parts)})")
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    return model.eval()


def build_text_encoder(model: SingleFileModel, index: int, weights: bool, dtype: torch.dtype) -> nn.Module:
    """Text encoder ``index`` (CLIPTextModel, or CLIPTextModelWithProjection for SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te = model.settings["text_encoders"][index]
    cls = CLIPTextModelWithProjection if te.get("projection") else CLIPTextModel
    module = _instantiate(cls, CLIPTextConfig(**model.text_encoders[index]), weights)
    if not weights:
        return module.eval()
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = te["prefix"]
    tensors = model.file.tensors(prefix)
    if te["layout"] == "clip":
        state = convert_ldm_clip_checkpoint(tensors, remove_prefix=prefix)
    else:
        if te.get("drop_last_layer"):  # SD 2 conditions on the penultimate layer: the last one is unused
            last = f"{prefix}transformer.resblocks.{model.text_encoders[index]['num_hidden_layers']}."
            tensors = {k: v for k, v in tensors.items() if not k.startswith(last)}
        state = convert_open_clip_checkpoint(module, tensors, prefix=prefix)
        if not te.get("projection"):
            state.pop("text_projection.weight", None)
    if not hasattr(module, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return _assign(module, state, dtype, f"text encoder '{prefix}*'", model.path)


def build_unet(model: SingleFileModel, weights: bool, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    module = _instantiate(UNet2DConditionModel, model.unet, weights)
    if not weights:
        return module.eval()
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = convert_ldm_unet_checkpoint(model.file.tensors(UNET), model.unet)
    return _assign(module, state, dtype, f"UNet '{UNET}*'", model.path)


def build_vae(model: SingleFileModel, weights: bool, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL

    module = _instantiate(AutoencoderKL, model.vae, weights)
    if not weights:
        return module.eval()
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = convert_ldm_vae_checkpoint(model.file.tensors(VAE), model.vae)
    return _assign(module, state, dtype, f"VAE '{VAE}*'", model.path)


FULL_SIZE_SD2 = ([320, 640, 1280, 1280], 1024)  # (block_out_channels, cross_attention_dim)


def a1111_v_prediction_test(unet: nn.Module) -> bool:
    """A1111's test for an SD 2.x UNet (``is_using_v_parameterization_for_sd2``): at t = 999 with
    latents and text all 0.5, a v-prediction UNet's output minus its input averages below -1."""
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=p.dtype, device=p.device)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=p.device), context).sample
    return (out.float() - x.float()).mean().item() < -1


def settle_prediction_type(model: SingleFileModel, unet: nn.Module) -> None:
    """For an SD 2.x file that records no prediction type (nothing given either): full-size UNets
    get A1111's test run, as A1111 does; otherwise epsilon stays, with a warning. Sets
    ``model.prediction_type`` and ``model.prediction_source``."""
    if model.family != "sd2" or model.prediction_source != "default":
        return
    if (list(unet.config.block_out_channels), unet.config.cross_attention_dim) == FULL_SIZE_SD2:
        v = a1111_v_prediction_test(unet)
        model.prediction_type, model.prediction_source = ("v_prediction" if v else "epsilon"), "A1111's test run"
        logger.warning(
            "%s: an SD 2.x checkpoint that records no prediction type: A1111's test run says %s "
            "(give --v_parameterization if it is a v-prediction model)",
            model.path,
            model.prediction_type,
        )
    else:
        logger.warning(
            "%s: an SD 2.x checkpoint that records no prediction type: training it as epsilon. "
            "SD 2.x 768 models are v-prediction: pass --v_parameterization for those",
            model.path,
        )


def build_scheduler(model: SingleFileModel):
    """The DDPM training scheduler of SD 1.x / 2.x / SDXL with the model's prediction type."""
    from diffusers import DDPMScheduler

    # from_config keeps DDIM's keys (set_alpha_to_one) for the samplers built from this config
    return DDPMScheduler.from_config({**model.settings["scheduler"], "prediction_type": model.prediction_type})


def build_tokenizers(model: SingleFileModel, tokenizer_cache_dir: str | None = None) -> list:
    from tsm_trainer.base_models.single_file.tokenizers import clip_tokenizer

    return [
        clip_tokenizer(t["pad_token"], t["kohya_cache_name"], tokenizer_cache_dir) for t in model.settings["tokenizers"]
    ]
