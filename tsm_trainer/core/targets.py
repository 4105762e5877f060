"""Which modules get LoRA, per model family, and the key names they are saved under.

Families are data: module-path patterns (defaults from the paper's appendix A), key
prefixes and metadata strings. They are recognised by class name and config, so this file
imports no model library and serves diffusers classes and sd-scripts' own classes alike.

A pattern is a regular expression that must match a whole trailing part of the module path:
``to_q`` matches ``...attn1.to_q``; ``attn2\\.to_k`` only cross-attention keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from torch import nn

from tsm_trainer.core.key_names import PREFIX_TEXT_ENCODER, PREFIX_TRANSFORMER, PREFIX_UNET, diffusers_unet_to_sgm, lora_name

ATTENTION = ("to_q", "to_k", "to_v", r"to_out\.0")
CLIP_QV = ("q_proj", "v_proj")
CLIP_QKVO = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_QV = (r"SelfAttention\.q", r"SelfAttention\.v")


@dataclass(frozen=True)
class Family:
    """A model family's defaults.

    Attributes:
        name: short id (``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux``, ``pixart``, ``video``).
        denoiser_targets: patterns per denoiser class name; ``"*"`` is the fallback.
        text_encoder_targets: patterns per text-encoder kind (``clip``, ``t5``).
        timestep_space: ``ddpm`` or ``flow`` (DESIGN.md section 1).
        base_model_version: kohya's ``ss_base_model_version``.
        modelspec_architecture: ``modelspec.architecture`` of a LoRA for this family.
    """

    name: str
    denoiser_targets: dict[str, tuple[str, ...]]
    text_encoder_targets: dict[str, tuple[str, ...]]
    timestep_space: str
    base_model_version: str
    modelspec_architecture: str
    v2: bool = False
    resolution: int = 512

    def denoiser_patterns(self, denoiser: nn.Module) -> tuple[str, ...]:
        return self.denoiser_targets.get(type(denoiser).__name__, self.denoiser_targets["*"])


# Convolutions of ResNet blocks and down/up samplers (kohya's conv_dim), diffusers and SGM names.
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", r"(down|up)samplers\.0\.conv",
                r"in_layers\.2", r"out_layers\.3", "skip_connection", r"\d+\.op", r"\d+\.\d+\.conv")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("sd1", {"*": ATTENTION}, {"clip": CLIP_QV}, "ddpm", "sd_v1", "stable-diffusion-v1/lora"),
        Family("sd2", {"*": ATTENTION}, {"clip": CLIP_QV}, "ddpm", "sd_v2", "stable-diffusion-v2-768-v/lora",
               v2=True, resolution=768),
        Family("sdxl", {"*": ATTENTION}, {"clip": CLIP_QV}, "ddpm", "sdxl_base_v1-0",
               "stable-diffusion-xl-v1-base/lora", resolution=1024),
        Family("sd3", {"MMDiT": (r"attn\.qkv", r"attn\.proj"), "*": ATTENTION}, {"clip": CLIP_QKVO, "t5": T5_QV},
               "flow", "sd3", "stable-diffusion-3-medium/lora", resolution=1024),
        Family("flux", {"Flux": (r"(img|txt)_attn\.(qkv|proj)", r"single_blocks\.\d+\.linear[12]"),
                        "*": ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
               {"clip": CLIP_QV, "t5": T5_QV}, "flow", "flux1", "flux-1-dev/lora", resolution=1024),
        Family("pixart", {"*": ATTENTION}, {"t5": T5_QV}, "ddpm", "pixart_alpha", "pixart-alpha/lora",
               resolution=512),
        # VideoCrafter2 in the paper: k and v of spatial and temporal attention, OpenCLIP out_proj.
        Family("video", {"*": ("to_k", "to_v")}, {"clip": ("out_proj",)}, "ddpm", "t2v_unet3d",
               "text-to-video-unet3d/lora", resolution=256),
    ]
}


def unwrap_denoiser(denoiser):
    """The nn.Module behind sd-scripts' inference wrappers (``InferUNet2DConditionModel``,
    ``InferSdxlUNet2DConditionModel`` hold it as ``delegate``)."""
    while not isinstance(denoiser, nn.Module) and hasattr(denoiser, "delegate"):
        denoiser = denoiser.delegate
    return denoiser


def _cross_attention_dim(denoiser: nn.Module) -> int | None:
    """in_features of the first cross-attention key projection (sd-scripts' UNet keeps no config)."""
    for path, module in denoiser.named_modules():
        if path.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    return None


def detect_family(denoiser: nn.Module) -> Family:
    """The family of a denoiser, from its class name and (diffusers) config."""
    denoiser = unwrap_denoiser(denoiser)
    cls = type(denoiser).__name__
    config = getattr(denoiser, "config", None)
    get = (lambda k, d=None: getattr(config, k, None) if not isinstance(config, dict) else config.get(k, d)) if config is not None else (lambda k, d=None: d)
    if cls in ("SD3Transformer2DModel", "MMDiT"):
        return FAMILIES["sd3"]
    if cls in ("FluxTransformer2DModel", "Flux"):
        return FAMILIES["flux"]
    if cls in ("PixArtTransformer2DModel", "PixArtMS", "PixArt"):
        return FAMILIES["pixart"]
    if cls == "UNet3DConditionModel":
        return FAMILIES["video"]
    if cls == "SdxlUNet2DConditionModel":
        return FAMILIES["sdxl"]
    if cls == "UNet2DConditionModel":
        if get("addition_embed_type") == "text_time":
            return FAMILIES["sdxl"]
        cross = get("cross_attention_dim") or _cross_attention_dim(denoiser)
        return FAMILIES["sd2"] if cross == 1024 else FAMILIES["sd1"]
    raise ValueError(
        f"unknown denoiser class {cls}: supported are diffusers UNet2DConditionModel, UNet3DConditionModel, "
        "SD3Transformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel and sd-scripts' "
        "UNet2DConditionModel, SdxlUNet2DConditionModel, MMDiT, Flux"
    )


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; valid: {sorted(FAMILIES)}")
    return FAMILIES[name]


def denoiser_naming(denoiser: nn.Module, family: Family) -> tuple[str, Callable[[str], str]]:
    """(prefix, module-path translation) for the denoiser's keys.

    UNets use ``lora_unet``. A diffusers SDXL UNet's paths become SGM names. sd-scripts'
    own MMDiT / Flux classes already carry the reference names (``lora_unet``); diffusers
    transformers (SD3, Flux, PixArt) keep their paths under ``lora_transformer``, the form
    ComfyUI maps for diffusers-layout LoRAs.
    """
    cls = type(denoiser).__name__
    if family.name == "sdxl" and cls == "UNet2DConditionModel":
        cfg = denoiser.config
        with_attn = frozenset(i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t)
        return PREFIX_UNET, partial(diffusers_unet_to_sgm, layers_per_block=cfg.layers_per_block,
                                    up_blocks_with_attention=with_attn)
    if cls in ("SD3Transformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel"):
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
    return [f"{PREFIX_TEXT_ENCODER}3" if te is not None and text_encoder_kind(te) == "t5"
            else f"{PREFIX_TEXT_ENCODER}{i + 1}" for i, te in enumerate(text_encoders)]


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


def find_targets(root: nn.Module, patterns: re.Pattern, conv_patterns: re.Pattern | None = None) -> Iterator[tuple[str, nn.Module]]:
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


def lora_name_index(denoiser: nn.Module | None, text_encoders: list[nn.Module | None] = (),
                    family: Family | None = None) -> dict[str, tuple[int, str, nn.Module]]:
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


def layers_by_lora_name(denoiser: nn.Module | None, text_encoders: list[nn.Module | None] = (),
                        family: Family | None = None) -> dict[str, nn.Module]:
    """``{lora_name: module}``: :func:`lora_name_index` without the paths."""
    return {name: module for name, (_, _, module) in lora_name_index(denoiser, text_encoders, family).items()}
