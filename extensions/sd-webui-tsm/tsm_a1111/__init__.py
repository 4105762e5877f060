"""AUTOMATIC1111 adapter for TimeStep Master files (thin: the logic lives in ``tsm_trainer.runtime.online``).

Nothing here imports A1111: the webui objects (``shared.sd_model``, ``p``, ``CFGDenoiserParams``)
are passed in by ``scripts/tsm_extension.py``, so the adapter is tested without a webui.
"""

from __future__ import annotations

import os
import sys


def _ensure_tsm_trainer() -> None:
    """Make ``tsm_trainer`` importable: installed into the webui venv, or this extension folder is
    a symlink into the tsm-trainer repo (``<repo>/extensions/sd-webui-tsm``): add the repo root."""
    try:
        import tsm_trainer

        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.realpath(__file__))  # <repo>/extensions/sd-webui-tsm/tsm_a1111
    repo = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    if os.path.isfile(os.path.join(repo, "tsm_trainer", "__init__.py")):
        # appended, not prepended: the repo's `networks/` namespace folder must never shadow
        # the built-in Lora extension's `networks.py`
        if repo not in sys.path:
            sys.path.append(repo)
        import tsm_trainer  # noqa: F401

        return
    raise ImportError(
        "sd-webui-tsm needs the tsm_trainer package: `pip install --no-deps /path/to/tsm-trainer` "
        "into the webui's venv, or symlink this folder from a tsm-trainer checkout"
    )


_ensure_tsm_trainer()

from .adapter import (  # noqa: E402
    LoraHost,
    find_tsm_files,
    parse_params,
    text_encoder_layer_index,
    timestep_from_sigma,
    unet_layer_index,
)
from .cards import card_description, card_item_fields  # noqa: E402
from .lora_network import TSMSamplingError  # noqa: E402
from .session import TSMExtraNetworkCore, TSMSession  # noqa: E402

__all__ = [
    "LoraHost",
    "TSMExtraNetworkCore",
    "TSMSamplingError",
    "TSMSession",
    "find_tsm_files",
    "parse_params",
    "text_encoder_layer_index",
    "timestep_from_sigma",
    "unet_layer_index",
    "card_description",
    "card_item_fields",
]
