"""Strict parsing of kohya-style ``network_args`` (``key=value`` strings) into a TSMConfig.

sd-scripts hands every ``--network_args`` value over as a string (``dropout`` may also arrive
as a float or None). A typo must not be silently ignored: an unknown key is an error that
lists the valid keys, and a bad value names its key.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from tsm_trainer.core.intervals import parse_scales
from tsm_trainer.core.modules import MIXTURES


def _optional_float(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return float(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {value!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {value!r}")
        return value

    return parse


def _list(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = tuple(v.strip() for v in items if v.strip())
    if not items:
        raise ValueError("empty list")
    return items


# key -> (parser, TSMConfig field or None, help)
NETWORK_ARGS: dict[str, tuple[Callable[[Any], Any], str | None, str]] = {
    "tsm_scales": (parse_scales, "scales", "scales, core first: '8' to foster 8 experts, '8,1' to assemble"),
    "tsm_stage": (_choice(("foster", "assemble")), "stage", "foster (train experts) or assemble (train routers)"),
    "tsm_experts": (_list, None, "assemble: fostered files, comma-separated, one per scale (or per interval)"),
    "tsm_mixture": (_choice(MIXTURES), "mixture", "asymmetric (core ungated, the paper's) or symmetric (ablation)"),
    "tsm_interval": (int, "interval", "foster only this expert of the scale (with --min/--max_timestep set to it)"),
    "conv_dim": (int, "conv_rank", "rank of 3x3 convs in ResNet blocks and samplers (off when unset)"),
    "conv_alpha": (float, "conv_alpha", "alpha of those convs (default: conv_dim)"),
    "dropout": (_optional_float, "dropout", "neuron dropout on the LoRA hidden"),
    "rank_dropout": (_optional_float, "rank_dropout", "drop ranks per sample"),
    "module_dropout": (_optional_float, "module_dropout", "skip a module's LoRA per step"),
    "unet_targets": (_list, "denoiser_targets", "module-path patterns of the denoiser, comma-separated"),
    "text_encoder_targets": (_list, "text_encoder_targets", "module-path patterns of the text encoders"),
    "train_t5xxl": (_bool, None, "also train a LoRA on the T5 text encoder (SD3, Flux)"),
}


def parse_network_args(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split raw network_args into (TSMConfig fields, other options).

    Raises:
        ValueError: an unknown key (listing the valid ones) or a value that doesn't parse.
    """
    fields: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, raw in kwargs.items():
        if key not in NETWORK_ARGS:
            valid = "\n".join(f"  {k}: {h}" for k, (_, _, h) in NETWORK_ARGS.items())
            close = difflib.get_close_matches(key, NETWORK_ARGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown network_args key {key!r} for networks.tsm_lora{hint}. Valid keys:\n{valid}")
        parser, field_name, _ = NETWORK_ARGS[key]
        try:
            value = parser(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"network_args {key}={raw!r}: {e}") from None
        if field_name is None:
            options[key] = value
        else:
            fields[field_name] = value
    return fields, options
