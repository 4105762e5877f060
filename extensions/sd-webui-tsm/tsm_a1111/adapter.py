"""The A1111 side of ``<tsm:name:weight>``: which files and layers, which t, and its lifecycle.

How A1111 drives it (references are to AUTOMATIC1111/stable-diffusion-webui, measured on v1.8.0):

* ``modules/extra_networks.py``: ``activate(p, extra_network_data)`` calls ``ExtraNetwork.activate(p,
  params_list)`` for the networks in the prompt, then ``activate(p, [])`` for every other one -- and
  for one whose ``activate`` raised (the exception is only printed). Hires fix calls ``activate``
  again before its conds; ``deactivate(p)`` runs after the batch.
* ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward`` calls ``cfg_denoiser_callback(
  CFGDenoiserParams(x_in, image_cond_in, sigma_in, ..., self))`` (``denoiser`` exists from v1.8.0)
  before every ``self.inner_model(x_in, sigma_in, ...)``; exceptions in callbacks are printed and
  ignored (``modules/script_callbacks.py``). k-diffusion's ``CompVisDenoiser`` hands the UNet
  ``sigma_to_t(sigma)``; DDIM/PLMS/UniPC's ``CompVisTimestepsDenoiser`` the value itself.
* Built-in Lora (``extensions-builtin/Lora``) hosts the weights: see ``lora_network.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata, load_file, read_metadata
from tsm_trainer.core.targets import text_encoder_key_path
from tsm_trainer.runtime.online import sgm_layer_index

from .lora_network import QKV


class LoraHost(NamedTuple):
    """The built-in Lora extension's modules: ``network`` (classes) and ``networks`` (state)."""

    network: object
    networks: object


# -- files ------------------------------------------------------------------------------------------
def find_tsm_files(folder: str) -> dict[str, str]:
    """``{name: path}`` of the TSM files under ``folder`` (``.safetensors`` with ``tsm.format_version``).

    The name is the file name without extension (``<tsm:name:1.0>``); a file in a subfolder is also
    reachable as ``sub/name``. Plain LoRAs and unreadable files are skipped.
    """
    found: dict[str, str] = {}
    if not folder or not os.path.isdir(folder):
        return found
    for root, _, files in os.walk(folder, followlinks=True):
        for f in sorted(files):
            if not f.endswith(".safetensors"):
                continue
            path = os.path.join(root, f)
            try:
                if "tsm.format_version" not in read_metadata(path):
                    continue
            except TSMFileError:
                continue
            rel = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
            found.setdefault(os.path.splitext(f)[0], path)
            found.setdefault(rel, path)
    return found


class FileCache:
    """Loaded files by path, reloaded when the file's mtime changes."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: dict[str, tuple[float, dict, dict, dict]] = {}

    def get(self, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
        mtime = os.path.getmtime(path)
        hit = self._items.get(path)
        if hit is None or hit[0] != mtime:
            tensors, metadata = load_file(path)
            hit = (mtime, tensors, metadata, check_tsm_metadata(metadata, path))
            self._items.pop(path, None)
            self._items[path] = hit
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))
        return hit[1], hit[2], hit[3]


def parse_params(params_list: Iterable, default_multiplier: float = 1.0) -> list[tuple[str, float]]:
    """``[(name, multiplier)]`` from A1111's ``ExtraNetworkParams`` (``<tsm:name:0.5>`` -> items
    ``["name", "0.5"]``, ``positional`` the same; ``modules/extra_networks.py``)."""
    out = []
    for params in params_list:
        items = list(getattr(params, "positional", None) or params.items)
        if not items:
            raise ValueError("<tsm:...> needs a file name, e.g. <tsm:my_tsm:1.0>")
        try:
            multiplier = float(items[1]) if len(items) > 1 else float(default_multiplier)
        except ValueError:
            raise ValueError(f"<tsm:{':'.join(map(str, items))}>: weight {items[1]!r} is not a number") from None
        out.append((str(items[0]).strip(), multiplier))
    return out


# -- layers -----------------------------------------------------------------------------------------
def unet_layer_index(sd_model) -> dict[str, nn.Module]:
    """``{kohya name: layer}`` of ``sd_model.model.diffusion_model`` (A1111's ldm/sgm UNet holds the
    original ``input_blocks...`` layout; SD1 files' diffusers names are translated by
    :func:`tsm_trainer.runtime.online.resolve_layers`, SDXL files already use these names)."""
    return sgm_layer_index(sd_model.model.diffusion_model, "lora_unet")


def _hf_clip_index(clip: nn.Module, prefix: str) -> dict[str, tuple[nn.Module, str | None]]:
    out = {}
    for path, m in clip.named_modules():
        if isinstance(m, nn.Linear):
            out[f"{prefix}_{text_encoder_key_path(clip, path).replace('.', '_')}"] = (m, None)
    return out


def _open_clip_index(model: nn.Module, prefix: str) -> dict[str, tuple[nn.Module, str | None]]:
    """kohya CLIP names -> OpenCLIP modules (as Lora's ``convert_diffusers_name_to_compvis``:
    ``self_attn`` -> ``attn``, ``mlp_fc1`` -> ``mlp.c_fc``, ``mlp_fc2`` -> ``mlp.c_proj``); q/k/v/out
    are parts of ``attn`` (a ``MultiheadAttention``: q/k/v are row blocks of ``in_proj_weight``)."""
    out = {}
    for i, block in enumerate(model.transformer.resblocks):
        base = f"{prefix}_text_model_encoder_layers_{i}"
        for part in (*QKV, "_out_proj"):
            out[f"{base}_self_attn{part}"] = (block.attn, part)
        out[f"{base}_mlp_fc1"] = (block.mlp.c_fc, None)
        out[f"{base}_mlp_fc2"] = (block.mlp.c_proj, None)
    return out


def _encoder_index(embedder, prefix: str) -> dict[str, tuple[nn.Module, str | None]]:
    wrapped = getattr(embedder, "wrapped", embedder)
    if isinstance(getattr(wrapped, "transformer", None), nn.Module):  # FrozenCLIPEmbedder: HF CLIPTextModel
        return _hf_clip_index(wrapped.transformer, prefix)
    model = getattr(wrapped, "model", None)  # FrozenOpenCLIPEmbedder(2)
    if model is not None and hasattr(getattr(model, "transformer", None), "resblocks"):
        return _open_clip_index(model, prefix)
    return {}


def text_encoder_layer_index(sd_model) -> dict[str, tuple[nn.Module, str | None]]:
    """``{kohya name: (layer, part)}`` of the text encoder(s) (``part``: see :func:`_open_clip_index`):
    SD1/SD2 ``sd_model.cond_stage_model.wrapped`` (``lora_te_``), SDXL
    ``sd_model.conditioner.embedders[i].wrapped`` (``lora_te1_``, ``lora_te2_``), as Lora's
    ``assign_network_names_to_compvis_modules`` walks them."""
    conditioner = getattr(sd_model, "conditioner", None)
    if getattr(sd_model, "is_sdxl", False) and conditioner is not None:
        out = {}
        k = 0
        for embedder in conditioner.embedders:
            index = _encoder_index(embedder, f"lora_te{k + 1}")
            if index:
                out.update(index)
                k += 1
        return out
    cond = getattr(sd_model, "cond_stage_model", None)
    return _encoder_index(cond, "lora_te") if cond is not None else {}


# -- sigma -> t -------------------------------------------------------------------------------------
def timestep_from_sigma(
    sigma: torch.Tensor, denoiser, timestep_space: str = "ddpm", num_train_timesteps: int = 1000
) -> torch.Tensor:
    """The t the UNet receives for ``CFGDenoiserParams.sigma`` (docs/design.md section 6).

    k-diffusion: ``denoiser.inner_model.sigma_to_t(sigma)`` (the same call, with the wrapper's own
    ``quantize`` setting, that ``DiscreteEpsDDPMDenoiser.forward`` makes); DDIM/PLMS/UniPC: the
    value itself (their ``inner_model`` has no ``sigma_to_t``); flow models (SD3): ``sigma * T``.
    """
    sigma = torch.as_tensor(sigma)
    if timestep_space == "flow":
        return sigma.double() * num_train_timesteps
    if denoiser is None:
        raise RuntimeError("CFGDenoiserParams.denoiser is missing: sd-webui-tsm needs A1111 1.8.0 or newer")
    to_t = getattr(getattr(denoiser, "inner_model", None), "sigma_to_t", None)
    if to_t is None:
        return sigma
    return to_t(sigma)
