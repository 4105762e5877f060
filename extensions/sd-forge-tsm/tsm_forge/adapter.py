"""The Forge side of TSM sampling: objects in, objects out, no Forge import (testable without it).

How Forge runs its UNet (stable-diffusion-webui-forge, checked at commit dfdcbab):

* ``backend/sampling/sampling_function.py`` ``calc_cond_uncond_batch`` calls
  ``model_options["model_function_wrapper"](model.apply_model, {"input": x, "timestep": sigma_batch,
  "c": c, "cond_or_uncond": ...})`` when the key is set (else ``model.apply_model(x, sigma, **c)``);
  ``timestep`` there is k-diffusion's sigma.
* ``backend/modules/k_model.py`` ``KModel.apply_model`` hands the UNet
  ``self.predictor.timestep(sigma).float()`` (``backend/modules/k_prediction.py``: nearest index in
  log-sigma for discrete models, ``sigma * 1000`` for SD3, ``sigma`` itself for Flux).
* ``backend/patcher/base.py`` ``set_model_unet_function_wrapper`` stores the wrapper in
  ``model_options``; ``UnetPatcher.clone`` deep-copies ``model_options`` (``backend/patcher/unet.py``)
  and ``model_patches_to`` calls ``wrapper.to(device)`` / ``wrapper.to(dtype)``.
* ``backend/operations.py``: Forge's ``Linear`` classes are plain ``torch.nn.Module`` subclasses
  (not ``nn.Linear``); bnb-4bit (``ForgeParams4bit``, ``weight.bnb_quantized``) and GGUF
  (``weight.gguf_cls``) weights are dequantised inside ``forward``.

So: at every UNet call the wrapper converts sigma to the t the UNet receives, tells the runtime,
then calls the model. Normal weights: :class:`tsm_trainer.runtime.ExpertSwitcher` merges the active
expert (re-merging only when t crosses into another expert's interval) and restores exactly.
Quantized weights (or ``mode=online``, or routers): :class:`tsm_trainer.runtime.OnlineTSM` adds the
LoRA output to each layer's output and never writes a weight.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from tsm_trainer.export import module_names, text_encoder_lora
from tsm_trainer.file_format import TSMFileError, check_tsm_metadata, load_file
from tsm_trainer.runtime import ExpertSwitcher, OnlineTSM, resolve_layers

# Predictors whose UNet receives sigma in [0, 1] (Flux, Chroma): t = sigma * T (DESIGN.md section 1).
SIGMA_INPUT_PREDICTORS = frozenset({"PredictionFlux"})
FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("auto", "merge", "online")


# ----------------------------------------------------------------------------------------------
# timestep and layers
# ----------------------------------------------------------------------------------------------
def timestep_from_sigma(predictor, sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """t on the 0..T axis exactly as Forge's UNet receives it (``KModel.apply_model``)."""
    t = predictor.timestep(sigma).float()
    if type(predictor).__name__ in SIGMA_INPUT_PREDICTORS:
        t = t * num_train_timesteps
    return t


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (any(c.__name__ == "Linear" for c in type(m).__mro__)
                                        and hasattr(m, "weight"))


def forge_layer_index(diffusion_model: nn.Module, prefix: str = "lora_unet") -> dict[str, nn.Module]:
    """``{kohya name: layer}`` of Forge's ``unet.model.diffusion_model`` (SGM names such as
    ``input_blocks.4.1...``), counting Forge's own Linear classes, which are not ``nn.Linear``."""
    return {f"{prefix}_{path.replace('.', '_')}": m for path, m in diffusion_model.named_modules()
            if path and (_is_linear_like(m) or (isinstance(m, nn.Conv2d) and m.groups == 1))}


def is_quantized(layer: nn.Module) -> bool:
    """True for weights that must not be written: bnb 4-bit, GGUF, fp8 or any non-float storage."""
    w = getattr(layer, "weight", None)
    if w is None:
        return True
    return (hasattr(w, "bnb_quantized") or getattr(w, "gguf_cls", None) is not None
            or w.dtype not in FLOAT_STORAGE)


def _storage_is_float(unet_model) -> bool:
    # extensions-builtin/sd_forge_lora/networks.py: online LoRA only for non fp32/fp16/bf16 storage.
    storage = getattr(unet_model, "storage_dtype", torch.float32)
    return storage in FLOAT_STORAGE


# ----------------------------------------------------------------------------------------------
# online path on Forge layers
# ----------------------------------------------------------------------------------------------
class _LinearView(nn.Linear):
    """An ``nn.Linear``-typed face of a Forge layer for :class:`OnlineTSM`: it holds no weight copy
    (``weight`` is an empty tensor carrying only the LoRA's device and dtype); its forward is the
    Forge layer's own forward."""

    def __init__(self, layer: nn.Module, in_features: int, out_features: int, device, dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.empty(0, device=device, dtype=dtype)
        self.bias = None
        self._target = [layer]
        self._previous = layer.__dict__.get("forward")  # another extension's instance-level forward

    def forward(self, x, *args, **kwargs):
        layer = self._target[0]
        if self._previous is not None:
            return self._previous(x, *args, **kwargs)
        return type(layer).forward(layer, x, *args, **kwargs)


class _Conv2dView(nn.Conv2d):
    """As :class:`_LinearView` for a Conv2d (ungrouped)."""

    def __init__(self, layer: nn.Conv2d, device, dtype):
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "output_padding", "transposed"):
            setattr(self, attr, getattr(layer, attr))
        self.weight = torch.empty(0, device=device, dtype=dtype)
        self.bias = None
        self._target = [layer]
        self._previous = layer.__dict__.get("forward")

    def forward(self, x):
        layer = self._target[0]
        if self._previous is not None:
            return self._previous(x)
        return type(layer).forward(layer, x)


def _views(tensors: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], device, dtype) -> dict[str, nn.Module]:
    views = {}
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d):
            views[name] = _Conv2dView(layer, device, dtype)
            continue
        down = next(v for k, v in tensors.items() if k.startswith(name + ".") and k.endswith("lora_down.weight"))
        up = next(v for k, v in tensors.items() if k.startswith(name + ".") and k.endswith("lora_up.weight"))
        if down.dim() != 2:
            raise TSMFileError(f"{name}: a conv LoRA for a Linear layer")
        views[name] = _LinearView(layer, down.shape[1], up.shape[0], device, dtype)
    return views


class _OnlineOnForge:
    """:class:`OnlineTSM` on views of Forge layers; the Forge layers' forward is redirected to the
    TSM modules, and put back by :meth:`restore`. No weight is ever written."""

    def __init__(self, tensors, metadata, layers, multiplier, path, device, dtype):
        self.layers = dict(layers)
        self.views = _views(tensors, self.layers, device, dtype)
        self.online = OnlineTSM(tensors, metadata, self.views, multiplier, path)
        self.device = torch.device(device)
        for name, layer in self.layers.items():
            layer.forward = self.views[name].forward  # now the TSM module's forward (OnlineTSM.apply_to)

    def set_timestep(self, t, batch_size=None):
        self.online.set_timestep(t, batch_size)

    def to_device(self, device: torch.device) -> None:
        if device != self.device:
            for m in self.online.modules.values():
                m.to(device)
            self.device = device

    def restore(self) -> None:
        for name, layer in self.layers.items():
            previous = self.views[name]._previous
            if previous is not None:
                layer.forward = previous
            else:
                layer.__dict__.pop("forward", None)
        self.online.restore()
        self.layers.clear()


# ----------------------------------------------------------------------------------------------
# one TSM file on one UNet
# ----------------------------------------------------------------------------------------------
class ForgeTSM:
    """One TSM file applied to Forge's diffusion model for one sampling run.

    Args:
        tensors, metadata: the native file (``tsm_trainer.file_format.load_file``).
        layers: ``{kohya name: layer}`` of the UNet modules of the file.
        merge: True for the stage-1 merge path (:class:`ExpertSwitcher`), False for the online path.
        device, dtype: where the LoRA factors live and compute (online path).
    """

    def __init__(self, tensors, metadata, layers, multiplier: float = 1.0, path: str = "<file>",
                 merge: bool = True, device="cpu", dtype=torch.float32):
        self.path = path
        self.info = check_tsm_metadata(metadata, path)
        self.T = self.info["num_train_timesteps"]
        self.merge = merge
        self.calls = 0
        self.history: list[int | None] = []  # the merged expert at each call (merge path)
        if merge:
            self.runtime = ExpertSwitcher(tensors, metadata, layers, multiplier, path)
        else:
            self.runtime = _OnlineOnForge(tensors, metadata, layers, multiplier, path, device, dtype)

    @property
    def merges(self) -> int:
        return self.runtime.merges if self.merge else 0

    @property
    def active(self) -> int | None:
        return self.runtime.active if self.merge else None

    def set_timestep(self, t: torch.Tensor, batch_size: int, device: torch.device) -> None:
        self.calls += 1
        if self.merge:
            # Forge merges its own LoRAs under inference_mode (backend/patcher/lora.py LoraLoader.refresh),
            # so weights may be inference tensors, writable only inside inference_mode.
            with torch.inference_mode():
                self.runtime.set_timestep(t)
            self.history.append(self.runtime.active)
        else:
            self.runtime.to_device(device)
            self.runtime.set_timestep(t, batch_size)

    def restore(self) -> None:
        with torch.inference_mode():
            self.runtime.restore()


class TSMSamplingWrapper:
    """Forge's ``model_function_wrapper``: ``wrapper(apply_model, {"input", "timestep", "c", ...})``.

    Chains an existing wrapper. Survives ``UnetPatcher.clone`` (deep copy returns itself: it holds
    the model's layers) and ``model_patches_to`` (``to`` returns itself; devices follow the input).
    """

    def __init__(self, networks: Sequence[ForgeTSM], predictor, previous: Callable | None = None):
        self.networks = list(networks)
        self.predictor = predictor
        self.previous = previous

    def __call__(self, apply_model, args):
        x, sigma = args["input"], args["timestep"]
        for net in self.networks:
            t = timestep_from_sigma(self.predictor, sigma, net.T)
            net.set_timestep(t, x.shape[0], x.device)
        if self.previous is not None:
            return self.previous(apply_model, args)
        return apply_model(x, sigma, **args["c"])

    def to(self, *args, **kwargs):
        return self

    def __deepcopy__(self, memo):
        return self


@dataclass
class TSMRequest:
    """One ``<tsm:name:te:unet>`` tag, resolved to a file."""

    path: str
    unet_multiplier: float = 1.0
    te_multiplier: float = 1.0
    mode: str = "auto"


def parse_params(items: Sequence[str], named: Mapping[str, str] | None = None) -> tuple[str, float, float, str]:
    """(name, unet multiplier, te multiplier, mode) of an extra-network tag, as Forge's LoRA:
    ``<tsm:name>``, ``<tsm:name:w>`` (both), ``<tsm:name:te:unet>``, plus ``te=``, ``unet=``, ``mode=``."""
    named = dict(named or {})
    positional = [i for i in items if not (isinstance(i, str) and "=" in i)]
    for i in items:
        if isinstance(i, str) and "=" in i:
            k, v = i.split("=", 1)
            named.setdefault(k, v)
    if not positional:
        raise ValueError("<tsm:...> needs a file name, e.g. <tsm:my_experts:1.0>")
    name = positional[0]
    te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
    unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    mode = named.get("mode", "auto")
    if mode not in MODES:
        raise ValueError(f"<tsm:{name}>: mode={mode!r}, expected one of {MODES}")
    return name, unet, te, mode


_FILE_CACHE: dict[tuple, tuple[dict, dict]] = {}


def load_cached(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _FILE_CACHE:
        while len(_FILE_CACHE) >= 4:
            _FILE_CACHE.pop(next(iter(_FILE_CACHE)))
        _FILE_CACHE[key] = load_file(path)
    return _FILE_CACHE[key]


def apply_to_unet(unet_patcher, requests: Iterable[TSMRequest], layer_index: Mapping[str, nn.Module] | None = None,
                  loader: Callable[[str], tuple[dict, dict]] = load_cached):
    """Clone Forge's UnetPatcher and install the TSM wrapper on the clone.

    At most one file takes the merge path (a second merging file would overwrite the first's
    merge); files on quantized weights, assembled files, ``mode=online`` and every further file
    run online. The layers are the shared model's: call ``restore()`` on each returned network
    when sampling ends.

    Returns:
        (patched clone, [ForgeTSM, ...]).
    """
    model = unet_patcher.model  # KModel (backend/modules/k_model.py)
    index = forge_layer_index(model.diffusion_model) if layer_index is None else layer_index
    device = getattr(unet_patcher, "load_device", None) or torch.device("cpu")
    dtype = getattr(model, "computation_dtype", torch.float32)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    storage_float = _storage_is_float(model)
    networks: list[ForgeTSM] = []
    merging = False
    try:
        for req in requests:
            if req.unet_multiplier == 0:
                continue
            tensors, metadata = loader(req.path)
            info = check_tsm_metadata(metadata, req.path)
            names = [n for n in module_names(tensors) if not n.startswith("lora_te")]
            if not names:
                continue
            layers = resolve_layers(names, index, req.path)
            quantized = not storage_float or any(is_quantized(layers[n]) for n in names)
            stage1 = info["stage"] == "foster" and len(info["scales"]) == 1
            if req.mode == "merge" and (quantized or not stage1):
                raise TSMFileError(f"{req.path}: mode=merge needs a fostered file on unquantized weights")
            merge = req.mode != "online" and stage1 and not quantized and not merging
            tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te")}
            if merge:
                tensors = {k: v.to(device) for k, v in tensors.items()}
            networks.append(ForgeTSM(tensors, metadata, layers, req.unet_multiplier, req.path, merge=merge,
                                     device=device, dtype=dtype))
            merging |= merge
    except BaseException:
        for net in networks:
            net.restore()
        raise
    if not networks:
        return unet_patcher, []
    unet = unet_patcher.clone()
    previous = unet.model_options.get("model_function_wrapper")
    unet.set_model_unet_function_wrapper(TSMSamplingWrapper(networks, model.predictor, previous))
    return unet, networks


def apply_text_encoder(clip, requests: Iterable[TSMRequest], key_map_fn: Callable, load_lora_fn: Callable,
                       loader: Callable[[str], tuple[dict, dict]] = load_cached):
    """The shared text-encoder LoRA through Forge's own patching: ``clip.clone().add_patches``.

    ``key_map_fn`` / ``load_lora_fn`` are Forge's ``backend.patcher.lora.model_lora_keys_clip`` and
    ``load_lora``, as ``extensions-builtin/sd_forge_lora/networks.py`` uses them. Forge merges the
    patch when it loads the text encoder and takes it out when a later run lacks it.
    """
    patched = None
    for req in requests:
        if req.te_multiplier == 0:
            continue
        tensors, _ = loader(req.path)
        te = text_encoder_lora(tensors)
        if not te:
            continue
        if patched is None:
            patched = clip.clone()
        patches, unmatched = load_lora_fn(te, key_map_fn(patched.cond_stage_model))
        if unmatched:
            warnings.warn(f"[TSM] {req.path}: {len(unmatched)} text-encoder key(s) not in this model, "
                          f"e.g. {list(unmatched)[:3]}")
        patched.add_patches(filename=f"tsm:{req.path}", patches=patches, strength_patch=req.te_multiplier,
                            strength_model=1.0, online_mode=False)
    return clip if patched is None else patched


class Controller:
    """Lifecycle over Forge's processing object ``p`` (modules/processing.py):

    * extra network ``activate(p, params_list)``: resolve tags to files (stored on ``p``);
    * script ``process_batch``: text-encoder LoRA on ``p.sd_model.forge_objects.clip``
      (after ``forge_objects_after_applying_lora.shallow_copy()``, before ``p.setup_conds()``);
    * script ``process_before_every_sampling``: restore any previous run, then patch a clone of
      ``p.sd_model.forge_objects.unet`` (called again for the hires pass);
    * script ``post_sample`` / ``postprocess``: restore every weight and forward.
    """

    ATTR = "tsm_requests"

    def __init__(self, find_file: Callable[[str], str | None], key_map_fn: Callable | None = None,
                 load_lora_fn: Callable | None = None, loader: Callable = load_cached):
        self.find_file = find_file
        self.key_map_fn = key_map_fn
        self.load_lora_fn = load_lora_fn
        self.loader = loader
        self.networks: list[ForgeTSM] = []

    def activate(self, p, params_list) -> list[TSMRequest]:
        requests = []
        for params in params_list:
            name, unet, te, mode = parse_params(list(params.items))
            path = self.find_file(name)
            if path is None:
                raise TSMFileError(f"<tsm:{name}>: no such TSM file (looked for {name}.safetensors)")
            requests.append(TSMRequest(path, unet, te, mode))
        setattr(p, self.ATTR, requests)
        return requests

    def process_batch(self, p) -> None:
        requests = getattr(p, self.ATTR, None)
        if not requests or self.key_map_fn is None:
            return
        objects = p.sd_model.forge_objects
        objects.clip = apply_text_encoder(objects.clip, requests, self.key_map_fn, self.load_lora_fn, self.loader)

    def process_before_every_sampling(self, p) -> None:
        self.restore()
        requests = getattr(p, self.ATTR, None)
        if not requests:
            return
        objects = p.sd_model.forge_objects
        objects.unet, self.networks = apply_to_unet(objects.unet, requests, loader=self.loader)

    def restore(self) -> None:
        networks, self.networks = self.networks, []
        for net in networks:
            if net.calls == 0:
                warnings.warn(f"[TSM] {net.path}: the UNet never called the TSM wrapper (another extension "
                              "replaced model_function_wrapper?); no expert was applied")
            net.restore()
