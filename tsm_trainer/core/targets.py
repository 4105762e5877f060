"""Which modules get LoRA and the key names they are saved under: the generic machinery.

What differs per model family (default patterns, key prefixes, metadata strings, detection) is
declared by the family's module and read from the registry (:mod:`tsm_trainer.families`); this
file names no family and imports no model library, so it serves diffusers classes and
sd-scripts' own classes alike.

A pattern is a regular expression that must match a whole trailing part of the module path:
``to_q`` matches ``...attn1.to_q``; ``attn2\\.to_k`` only cross-attention keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from torch import nn

from tsm_trainer.core.key_names import (
    PREFIX_TEXT_ENCODER,
    PREFIX_TRANSFORMER,
    PREFIX_UNET,
    diffusers_unet_to_sgm,
    lora_name,
)
from tsm_trainer.families import detect_family
from tsm_trainer.families.base import FamilySpec

# Convolutions of ResNet blocks and down/up samplers (kohya's conv_dim), diffusers and SGM names.
CONV_TARGETS = (
    "conv1",
    "conv2",
    "conv_shortcut",
    r"(down|up)samplers\.0\.conv",
    r"in_layers\.2",
    r"out_layers\.3",
    "skip_connection",
    r"\d+\.op",
    r"\d+\.\d+\.conv",
)


def denoiser_naming(denoiser: nn.Module, family: FamilySpec) -> tuple[str, Callable[[str], str]]:
    """(prefix, module-path translation) for the denoiser's keys.

    UNets use ``lora_unet``. A diffusers UNet of a family with ``sgm_unet_names`` (SDXL) is
    saved under SGM names. sd-scripts' own MMDiT / Flux classes already carry the reference
    names (``lora_unet``); diffusers transformers (``family.transformer_classes``: SD3, Flux,
    PixArt) keep their paths under ``lora_transformer``, the form ComfyUI maps for
    diffusers-layout LoRAs.
    """
    cls = type(denoiser).__name__
    if family.sgm_unet_names and cls == "UNet2DConditionModel":
        cfg: Any = denoiser.config  # a diffusers FrozenDict
        with_attn = frozenset(i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t)
        return PREFIX_UNET, partial(
            diffusers_unet_to_sgm, layers_per_block=cfg.layers_per_block, up_blocks_with_attention=with_attn
        )
    if cls in family.transformer_classes:
        return PREFIX_TRANSFORMER, _identity
    return PREFIX_UNET, _identity


def _identity(path: str) -> str:
    return path


def text_encoder_kind(text_encoder: nn.Module) -> str:
    cls = type(text_encoder).__name__
    if cls.startswith("T5") or cls.startswith("UMT5"):
        return "t5"
    if "CLIP" in cls or "OpenCLIP" in cls:
        return "clip"
    raise ValueError(f"unknown text encoder class {cls}: supported are CLIP/OpenCLIP (transformers) and T5 encoders")


def text_encoder_prefixes(text_encoders: list[nn.Module | None]) -> list[str]:
    """``lora_te`` for a single encoder; else ``lora_te1``/``lora_te2`` by position, T5 always
    ``lora_te3`` (sd-scripts' SD3 and Flux layout). None entries keep their position."""
    if len(text_encoders) == 1:
        return [PREFIX_TEXT_ENCODER]
    return [
        f"{PREFIX_TEXT_ENCODER}3"
        if te is not None and text_encoder_kind(te) == "t5"
        else f"{PREFIX_TEXT_ENCODER}{i + 1}"
        for i, te in enumerate(text_encoders)
    ]


def text_encoder_key_path(text_encoder: nn.Module, path: str) -> str:
    """Module path as UIs name it: CLIP keys start with ``text_model.`` (transformers 5's
    CLIPTextModel dropped that wrapper; CLIPTextModelWithProjection and every file keep it)."""
    if text_encoder_kind(text_encoder) == "clip" and not path.startswith("text_model."):
        return "text_model." + path
    return path


def compile_patterns(patterns: tuple[str, ...] | list[str]) -> re.Pattern:
    """One regex matching a module path whose trailing dotted part matches any pattern."""
    if not patterns:
        raise ValueError("empty target pattern list")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid target pattern {p!r}: {e}") from None
    return re.compile(r"(?:^|\.)(?:" + "|".join(f"(?:{p})" for p in patterns) + r")$")


def find_targets(
    root: nn.Module, patterns: re.Pattern, conv_patterns: re.Pattern | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every Linear, 1x1 Conv2d matching ``patterns`` and kxk Conv2d matching ``conv_patterns``."""
    for path, module in root.named_modules():
        if isinstance(module, nn.Linear):
            if patterns.search(path):
                yield path, module
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            is_1x1 = tuple(module.kernel_size) == (1, 1)
            if (is_1x1 and patterns.search(path)) or (conv_patterns is not None and conv_patterns.search(path)):
                yield path, module


def all_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every Linear and ungrouped Conv2d of a model (what a LoRA key can refer to)."""
    for path, module in root.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            yield path, module


def lora_name_index(
    denoiser: nn.Module | None, text_encoders: Sequence[nn.Module | None] = (), family: FamilySpec | None = None
) -> dict[str, tuple[int, str, nn.Module]]:
    """``{lora_name: (component, module path, module)}`` for every layer of a model, named as
    this family's files name them; component is -1 for the denoiser, else the text encoder's
    position. Resolves the keys of any kohya-style LoRA (ours or another trainer's).
    """
    index: dict[str, tuple[int, str, nn.Module]] = {}
    if denoiser is not None:
        prefix, translate = denoiser_naming(denoiser, family or detect_family(denoiser))
        for path, module in all_layers(denoiser):
            try:
                index[lora_name(prefix, translate(path))] = (-1, path, module)
            except ValueError:  # a diffusers layer with no SGM counterpart
                continue
    text_encoders = list(text_encoders)
    for i, (te, te_prefix) in enumerate(zip(text_encoders, text_encoder_prefixes(text_encoders))):
        if te is not None:
            for path, module in all_layers(te):
                index[lora_name(te_prefix, text_encoder_key_path(te, path))] = (i, path, module)
    return index


def layers_by_lora_name(
    denoiser: nn.Module | None, text_encoders: Sequence[nn.Module | None] = (), family: FamilySpec | None = None
) -> dict[str, nn.Module]:
    """``{lora_name: module}``: :func:`lora_name_index` without the paths."""
    return {name: module for name, (_, _, module) in lora_name_index(denoiser, text_encoders, family).items()}
