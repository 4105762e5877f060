"""Forge adapter for TimeStep Master (TSM) files. Logic lives in ``tsm_trainer.runtime.online``.

Importing this package makes ``tsm_trainer`` importable when the extension folder is a
symlink into the tsm-trainer repository (its realpath's grandparent is the repo root).
"""

from __future__ import annotations

import os
import sys


def _ensure_tsm_trainer() -> None:
    try:
        import tsm_trainer

        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.realpath(__file__))  # .../extensions/sd-forge-tsm/tsm_forge
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))  # the repo root
    if os.path.isdir(os.path.join(root, "tsm_trainer")) and root not in sys.path:
        sys.path.append(root)
    try:
        import tsm_trainer  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "sd-forge-tsm needs the tsm_trainer package: symlink this extension from a tsm-trainer checkout "
            "(ln -s /path/to/tsm-trainer/extensions/sd-forge-tsm extensions/) or run "
            "`pip install --no-deps /path/to/tsm-trainer` in Forge's venv"
        ) from e


_ensure_tsm_trainer()

from .adapter import (  # noqa: E402
    Controller,
    ForgeSession,
    RowSlice,
    TSMRequest,
    apply_text_encoder,
    apply_to_unet,
    diffusers_name_index,
    forge_layer_index,
    is_quantized,
    parse_params,
    timestep_from_sigma,
    unet_input_to_t,
)

__all__ = [
    "Controller",
    "ForgeSession",
    "RowSlice",
    "TSMRequest",
    "apply_text_encoder",
    "apply_to_unet",
    "diffusers_name_index",
    "forge_layer_index",
    "is_quantized",
    "parse_params",
    "timestep_from_sigma",
    "unet_input_to_t",
]
