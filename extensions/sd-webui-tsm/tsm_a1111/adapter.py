"""The A1111 side of ``<tsm:name:weight>``: which layers, which t, when to merge and restore.

How A1111 drives it (file references are to AUTOMATIC1111/stable-diffusion-webui 1.6+):

* ``modules/extra_networks.py``: ``activate(p, extra_network_data)`` calls ``ExtraNetwork.activate(p,
  params_list)`` for every registered network (with ``[]`` when the prompt doesn't mention it) before
  the conds are computed, and ``deactivate(p)`` after the batch. Hires fix calls ``activate`` again
  with ``p.hr_extra_network_data`` before ``calculate_hr_conds()`` (``modules/processing.py``,
  ``sample_hr_pass``): each call replaces the previous one.
* ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward`` builds ``sigma_in`` and calls
  ``cfg_denoiser_callback(CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step,
  state.sampling_steps, tensor, uncond, self))`` before every ``self.inner_model(x_in, sigma_in, ...)``.
  For k-diffusion samplers ``inner_model`` is ``CompVisDenoiser``/``CompVisVDenoiser``
  (``modules/sd_samplers_kdiffusion.py``, ``CFGDenoiserKDiffusion.inner_model``), which hands the UNet
  ``self.sigma_to_t(sigma)`` (k_diffusion/external.py, ``DiscreteEpsDDPMDenoiser.forward``). For
  DDIM/PLMS/UniPC (``modules/sd_samplers_timesteps.py``, ``CFGDenoiserTimesteps``) ``inner_model`` is
  ``CompVisTimestepsDenoiser`` (no ``sigma_to_t``) and "sigma" is the timestep the UNet receives.
* Built-in Lora (``extensions-builtin/Lora/networks.py``) merges lazily in each layer's patched
  forward (``network_apply_weights``: backs the weight up once in ``network_weights_backup``, and
  re-merges when the wanted set differs from ``network_current_names``). Before TSM backs a layer up
  it calls that function on the layer (``prepare_layer``), so Lora's own backup never contains a TSM
  expert and TSM's backup is "base + this prompt's LoRAs": both restore correctly.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from tsm_trainer.export import lora_delta, module_names, text_encoder_lora
from tsm_trainer.file_format import TSMFileError, check_tsm_metadata, load_file, read_metadata
from tsm_trainer.runtime import ExpertSwitcher, OnlineTSM, resolve_layers, sgm_layer_index
from tsm_trainer.targets import text_encoder_key_path
from tsm_trainer.timestep import TimestepCapture

log = logging.getLogger("sd-webui-tsm")

PrepareLayer = Callable[[nn.Module], None]


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
    :func:`tsm_trainer.runtime.resolve_layers`, SDXL files already use these names)."""
    return sgm_layer_index(sd_model.model.diffusion_model, "lora_unet")


class _Rows:
    """A "layer" whose weight is rows [a, b) of a parameter (OpenCLIP's fused ``in_proj_weight``):
    writes to ``weight`` go to the parameter."""

    def __init__(self, param: torch.Tensor, a: int, b: int):
        self.weight = param.detach()[a:b]


def _hf_clip_index(clip: nn.Module, prefix: str) -> dict[str, tuple[object, nn.Module]]:
    out = {}
    for path, m in clip.named_modules():
        if isinstance(m, nn.Linear):
            out[f"{prefix}_{text_encoder_key_path(clip, path).replace('.', '_')}"] = (m, m)
    return out


def _open_clip_index(model: nn.Module, prefix: str) -> dict[str, tuple[object, nn.Module]]:
    """kohya CLIP names -> OpenCLIP modules (as Lora's ``convert_diffusers_name_to_compvis``:
    ``self_attn`` -> ``attn``, ``mlp_fc1`` -> ``mlp.c_fc``, ``mlp_fc2`` -> ``mlp.c_proj``; q/k/v are
    row blocks of ``attn.in_proj_weight``)."""
    out = {}
    for i, block in enumerate(model.transformer.resblocks):
        base = f"{prefix}_text_model_encoder_layers_{i}"
        attn = block.attn
        d = attn.embed_dim
        for j, part in enumerate(("q", "k", "v")):
            out[f"{base}_self_attn_{part}_proj"] = (_Rows(attn.in_proj_weight, j * d, (j + 1) * d), attn)
        out[f"{base}_self_attn_out_proj"] = (attn.out_proj, attn)
        out[f"{base}_mlp_fc1"] = (block.mlp.c_fc, block.mlp.c_fc)
        out[f"{base}_mlp_fc2"] = (block.mlp.c_proj, block.mlp.c_proj)
    return out


def _encoder_index(embedder, prefix: str) -> dict[str, tuple[object, nn.Module]]:
    wrapped = getattr(embedder, "wrapped", embedder)
    if isinstance(getattr(wrapped, "transformer", None), nn.Module):   # FrozenCLIPEmbedder: HF CLIPTextModel
        return _hf_clip_index(wrapped.transformer, prefix)
    model = getattr(wrapped, "model", None)                              # FrozenOpenCLIPEmbedder(2)
    if model is not None and hasattr(getattr(model, "transformer", None), "resblocks"):
        return _open_clip_index(model, prefix)
    return {}


def text_encoder_layer_index(sd_model) -> dict[str, tuple[object, nn.Module]]:
    """``{kohya name: (layer with .weight, module whose forward uses it)}`` of the text encoder(s):
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
def timestep_from_sigma(sigma: torch.Tensor, denoiser, timestep_space: str = "ddpm",
                        num_train_timesteps: int = 1000) -> torch.Tensor:
    """The t the UNet receives for ``CFGDenoiserParams.sigma`` (DESIGN.md section 6).

    k-diffusion: ``denoiser.inner_model.sigma_to_t(sigma)`` (the same call, with the wrapper's own
    ``quantize`` setting, that ``DiscreteEpsDDPMDenoiser.forward`` makes); DDIM/PLMS/UniPC: the
    value itself (their ``inner_model`` has no ``sigma_to_t``); flow models (SD3): ``sigma * T``.
    """
    sigma = torch.as_tensor(sigma)
    if timestep_space == "flow":
        return sigma.double() * num_train_timesteps
    if denoiser is None:
        raise RuntimeError("CFGDenoiserParams.denoiser is missing: sd-webui-tsm needs A1111 1.6 or newer")
    to_t = getattr(getattr(denoiser, "inner_model", None), "sigma_to_t", None)
    if to_t is None:
        return sigma
    return to_t(sigma)


# -- the static text-encoder LoRA -------------------------------------------------------------------
class StaticTextEncoderLoRA:
    """The file's shared text-encoder LoRA merged into the weights (exact backup/restore)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], layers: Mapping[str, object], multiplier: float,
                 path: str = "<file>"):
        self.lora = text_encoder_lora(tensors)
        names = module_names(self.lora)
        missing = [n for n in names if n not in layers]
        if missing:
            raise TSMFileError(f"{path}: {len(missing)} text-encoder module(s) not in this model, e.g. {missing[:3]}")
        self.layers = {n: layers[n] for n in names}
        self.multiplier = multiplier
        self._backup: dict[str, torch.Tensor] = {}

    def apply(self) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                if name in self._backup:
                    continue
                w = layer.weight
                self._backup[name] = w.detach().clone()
                w.copy_((w.float() + self.multiplier * lora_delta(self.lora, name).to(w.device)).to(w.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for name, base in self._backup.items():
                self.layers[name].weight.copy_(base)
        self._backup.clear()


# -- one activation ---------------------------------------------------------------------------------
class TSMSession:
    """Everything one ``activate`` set up, undone by :meth:`restore`.

    The first fostered file goes to :class:`ExpertSwitcher` (the active expert merged, re-merged only
    on a boundary crossing, set from ``on_cfg_denoiser``); other files (assembled ones with routers,
    or a second file) to :class:`OnlineTSM`, whose t comes from a forward pre-hook on the UNet (the
    per-sample ``timesteps`` argument, so chunked cond/uncond batches route right). Text-encoder
    LoRAs are merged at the first text-encoder call (after every extra network is active) and
    restored at the end.

    Args:
        files: ``[(label, path, tensors, metadata, multiplier)]``.
        sd_model: A1111's ``shared.sd_model`` (``.model.diffusion_model``, text encoders).
        prepare_layer: called on a layer before TSM first backs it up (Lora's ``network_apply_weights``).
    """

    def __init__(self, files: Sequence[tuple[str, str, dict, dict, float]], sd_model,
                 prepare_layer: PrepareLayer | None = None):
        self.sd_model = sd_model
        self.prepare_layer = prepare_layer
        self.switcher: ExpertSwitcher | None = None
        self.switcher_info: dict | None = None
        self.online: list[tuple[OnlineTSM, TimestepCapture]] = []
        self.text_encoder: list[StaticTextEncoderLoRA] = []
        self.calls: list[tuple[float, int]] = []   # (t the UNet receives, active expert), for logs/tests
        self._hooks: list = []
        self._te_hook_modules: list[nn.Module] = []
        unet_index = None
        te_index = None
        diffusion_model = sd_model.model.diffusion_model
        try:
            for label, path, tensors, metadata, multiplier in files:
                info = check_tsm_metadata(metadata, path)
                names = module_names(tensors)
                unet_names = [n for n in names if not n.startswith("lora_te")]
                te_names = [n for n in names if n.startswith("lora_te")]
                if unet_index is None:
                    unet_index = unet_layer_index(sd_model)
                layers = resolve_layers(unet_names, unet_index, path)
                if te_names:
                    if te_index is None:
                        te_index = text_encoder_layer_index(sd_model)
                    te = StaticTextEncoderLoRA(tensors, {n: v[0] for n, v in te_index.items()}, multiplier, path)
                    self.text_encoder.append(te)
                    self._te_hook_modules.extend(te_index[n][1] for n in te.layers)
                unet_tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te")}
                if self.switcher is None and info["stage"] == "foster" and len(info["scales"]) == 1:
                    self.switcher = ExpertSwitcher(unet_tensors, metadata, layers, multiplier, path)
                    self.switcher_info = info
                else:
                    online = OnlineTSM(unet_tensors, metadata, layers, multiplier, path)
                    self.online.append((online, TimestepCapture(diffusion_model, online.context, timestep_scale=1.0)))
            if self.text_encoder:
                modules = list({id(m): m for m in self._te_hook_modules}.values())
                self._hooks = [m.register_forward_pre_hook(self._text_encoder_pre_hook) for m in modules]
        except BaseException:
            self.restore()
            raise

    # text encoder: merge at its first call, when every extra network (Lora included) is active
    def _text_encoder_pre_hook(self, module, args):
        self._remove_hooks()
        self._prepare({id(m): m for m in self._te_hook_modules}.values())
        for te in self.text_encoder:
            te.apply()
        return None

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _prepare(self, modules: Iterable[nn.Module]) -> None:
        if self.prepare_layer is None:
            return
        with torch.no_grad():
            for m in modules:
                self.prepare_layer(m)

    def on_cfg_denoiser(self, params) -> None:
        """``script_callbacks.on_cfg_denoiser``: make the expert of this call's t active."""
        if self.switcher is None:
            return
        info = self.switcher_info
        t = timestep_from_sigma(params.sigma, getattr(params, "denoiser", None), info["timestep_space"],
                                info["num_train_timesteps"])
        if self.switcher.active is None:  # first merge of this activation: settle Lora's own merge first
            self._prepare(self.switcher.layers.values())
        expert = self.switcher.set_timestep(t)
        self.calls.append((float(torch.as_tensor(t).reshape(-1)[0]), expert))

    def restore(self) -> None:
        """Put back every weight and forward this session touched (reverse order of application)."""
        self._remove_hooks()
        for online, capture in reversed(self.online):
            capture.remove()
            online.restore()
        self.online = []
        if self.switcher is not None:
            self.switcher.restore()
        for te in reversed(self.text_encoder):
            te.restore()


# -- the extra network, without A1111 --------------------------------------------------------------
class TSMExtraNetworkCore:
    """``ExtraNetwork("tsm")`` logic: ``scripts/tsm_extension.py`` mixes it into A1111's class.

    Args:
        models_dir: the folder of TSM files (``models/TSM`` or ``--tsm-dir``).
        get_sd_model: returns ``shared.sd_model``.
        default_multiplier: returns ``opts.extra_networks_default_multiplier``.
        prepare_layer: see :class:`TSMSession`.
    """

    def __init__(self, models_dir: Callable[[], str] | str, get_sd_model: Callable[[], object],
                 default_multiplier: Callable[[], float] = lambda: 1.0, prepare_layer: PrepareLayer | None = None):
        self._models_dir = models_dir if callable(models_dir) else (lambda: models_dir)
        self.get_sd_model = get_sd_model
        self.default_multiplier = default_multiplier
        self.prepare_layer = prepare_layer
        self.cache = FileCache()
        self.session: TSMSession | None = None
        self.available: dict[str, str] = {}

    @property
    def models_dir(self) -> str:
        return self._models_dir()

    def refresh(self) -> dict[str, str]:
        self.available = find_tsm_files(self.models_dir)
        return self.available

    def _path(self, name: str) -> str:
        path = self.available.get(name)
        if path is None or not os.path.isfile(path):
            path = self.refresh().get(name)
        if path is None:
            raise TSMFileError(f"<tsm:{name}>: no TSM file named {name!r} in {self.models_dir} "
                               "(a .safetensors with tsm.* metadata)")
        return path

    def activate(self, p, params_list) -> None:
        # Each call replaces the previous one (modules/extra_networks.py docstring); a generation that
        # failed before deactivate() is also cleaned up here.
        self.deactivate(p)
        entries = parse_params(params_list, self.default_multiplier())
        if not entries:
            return
        files = []
        for name, multiplier in entries:
            path = self._path(name)
            tensors, metadata, _ = self.cache.get(path)
            files.append((name, path, tensors, metadata, multiplier))
        self.session = TSMSession(files, self.get_sd_model(), self.prepare_layer)
        extra = getattr(p, "extra_generation_params", None)
        if isinstance(extra, dict):
            extra["TSM"] = ", ".join(f"{name}: {multiplier:g}" for name, multiplier in entries)

    def deactivate(self, p=None) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.restore()

    def on_cfg_denoiser(self, params) -> None:
        if self.session is not None:
            self.session.on_cfg_denoiser(params)

    def forget(self, *_args) -> None:
        """A (re)loaded checkpoint replaced the weights: drop the session without writing old backups."""
        session, self.session = self.session, None
        if session is not None:
            session._remove_hooks()
            for online, capture in session.online:
                capture.remove()
                online.restore()  # forwards only; never weights
