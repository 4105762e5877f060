"""Forge registration of ``<tsm:name:te:unet>``: thin glue around ``tsm_forge.Controller``."""

from __future__ import annotations

import os

from modules import extra_networks, paths, script_callbacks, scripts, shared

import tsm_forge
from tsm_forge.forge_keys import unet_key_map

TSM_DIR = os.path.join(paths.models_path, "tsm")


def _search_dirs() -> list[str]:
    dirs = [TSM_DIR, getattr(shared.cmd_opts, "lora_dir", None)]
    return [d for d in dirs if d and os.path.isdir(d)]


def find_file(name: str) -> str | None:
    """``name`` as a path, else ``name.safetensors`` anywhere under models/tsm or the Lora folder."""
    if os.path.isfile(name) and name.endswith(".safetensors"):
        return name
    wanted = name if name.endswith(".safetensors") else name + ".safetensors"
    for root_dir in _search_dirs():
        for root, _, files in os.walk(root_dir, followlinks=True):
            if wanted in files:
                return os.path.join(root, wanted)
    return None


def _forge_lora_functions():
    from backend.patcher.lora import load_lora, model_lora_keys_clip  # Forge's own key mapping

    return model_lora_keys_clip, load_lora


_key_map, _load_lora = _forge_lora_functions()
controller = tsm_forge.Controller(find_file, key_map_fn=_key_map, load_lora_fn=_load_lora, unet_key_map_fn=unet_key_map)


class ExtraNetworkTSM(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("tsm")

    def activate(self, p, params_list):
        controller.activate(p, params_list)
        if params_list:
            p.extra_generation_params["TSM"] = ", ".join(
                f"{os.path.splitext(os.path.basename(r.path))[0]}:{r.te_multiplier}:{r.unet_multiplier}"
                for r in getattr(p, controller.ATTR)
            )

    def deactivate(self, p):
        controller.finish(p)


def _register():
    if "tsm" not in extra_networks.extra_network_registry:
        extra_networks.register_extra_network(ExtraNetworkTSM())


script_callbacks.on_before_ui(_register)
os.makedirs(TSM_DIR, exist_ok=True)


class TSMScript(scripts.Script):
    def title(self):
        return "TimeStep Master (TSM)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        _register()  # API-only launches may skip on_before_ui

    def process_batch(self, p, *args, **kwargs):
        controller.process_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        controller.process_before_every_sampling(p)

    def post_sample(self, p, ps, *args):
        controller.finish(p)

    def postprocess(self, p, processed, *args):
        controller.finish(p)
