"""The Forge side of TSM sampling: objects in, objects out, no Forge import (testable without it).

How Forge runs its UNet (stable-diffusion-webui-forge, checked at commit dfdcbab):

* ``backend/modules/k_model.py`` ``KModel.apply_model`` calls
  ``self.diffusion_model(xc, t, context=..., ...)`` with ``t = self.predictor.timestep(sigma).float()``
  (``backend/modules/k_prediction.py``: nearest index in log-sigma for discrete models,
  ``sigma * 1000`` for SD3, ``sigma`` itself for Flux/Chroma's ``PredictionFlux``).
* ``backend/sampling/sampling_function.py`` runs ``model_options["model_function_wrapper"]``, one
  slot that extensions *replace*: MultiDiffusion's ``tiled_diffusion.py`` does
  ``model.set_model_unet_function_wrapper(implement)`` without chaining. So TSM does not use that
  slot: a forward pre-hook on ``diffusion_model`` sees every UNet call, whoever wraps
  ``apply_model`` (MultiDiffusion tiles, ControlNet, hires), with the exact t the UNet receives.
* ``modules/processing.py`` calls ``process_before_every_sampling`` twice before a hires pass (after
  ``before_hr`` and again after resetting ``forge_objects``): the first session is replaced unused,
  which is not an error; "never called" is only reported when a generation ends.
* ``backend/operations.py``: Forge's ``Linear`` classes are plain ``torch.nn.Module`` subclasses
  (not ``nn.Linear``); bnb-4bit (``ForgeParams4bit``, ``weight.bnb_quantized``) and GGUF
  (``weight.gguf_cls``) weights are dequantised inside ``forward``.
* Flux/SD3 files trained with diffusers names (``lora_transformer_transformer_blocks_0_attn_to_q``)
  target slices of Forge's fused layers (``double_blocks.0.img_attn.qkv`` rows 0..H); the map comes
  from Forge itself (``backend.patcher.lora.model_lora_keys_unet``, which yields
  ``(key, (dim, offset, size))`` for fused targets).

Merge or online, backups, restore and error handling are ``tsm_trainer.runtime.sampling_session``'s policy
(shared with the A1111 and ComfyUI adapters).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata, load_file
from tsm_trainer.core.lora_math import first_factor, module_names
from tsm_trainer.families import family_specs
from tsm_trainer.files.export import text_encoder_lora
from tsm_trainer.runtime.online import OnlineTSM, resolve_layers
from tsm_trainer.runtime.sampling_session import MODES, SamplingSession, SessionFile, weights_writable

# Predictors whose UNet receives sigma in [0, 1] (Flux, Chroma): t = sigma * T (docs/design.md section 1).
# Forge's class names live in the family specs (``forge_predictors``).
SIGMA_INPUT_PREDICTORS = frozenset(p for spec in family_specs() for p in spec.forge_predictors)
FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# timestep and layers
# ----------------------------------------------------------------------------------------------
def unet_input_to_t(predictor, unet_t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """t on the 0..T axis from the timestep Forge hands its diffusion model."""
    t = unet_t.float()
    if type(predictor).__name__ in SIGMA_INPUT_PREDICTORS:
        t = t * num_train_timesteps
    return t


def timestep_from_sigma(predictor, sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """t on the 0..T axis exactly as Forge's UNet receives it (``KModel.apply_model``)."""
    return unet_input_to_t(predictor, predictor.timestep(sigma), num_train_timesteps)


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (any(c.__name__ == "Linear" for c in type(m).__mro__) and hasattr(m, "weight"))


def forge_layer_index(diffusion_model: nn.Module, prefix: str = "lora_unet") -> dict[str, nn.Module]:
    """``{kohya name: layer}`` of Forge's ``unet.model.diffusion_model`` (SGM names such as
    ``input_blocks.4.1...``), counting Forge's own Linear classes, which are not ``nn.Linear``."""
    return {
        f"{prefix}_{path.replace('.', '_')}": m
        for path, m in diffusion_model.named_modules()
        if path and (_is_linear_like(m) or (isinstance(m, nn.Conv2d) and m.groups == 1))
    }


def is_quantized(layer: nn.Module) -> bool:
    """True for weights that must not be written: bnb 4-bit, GGUF, fp8 or any non-float storage."""
    return not weights_writable(layer)


class RowSlice(nn.Module):
    """Rows ``[offset, offset + size)`` of a fused layer's output (Flux/SD3 q, k, v inside ``qkv``), the
    target of a diffusers-named LoRA module. ``weight`` is a view of those rows (the merge path writes
    through it); the online path adds the LoRA output to those output columns."""

    def __init__(self, parent: nn.Module, offset: int, size: int):
        super().__init__()
        self._parent = [parent]  # not a submodule: named_modules must not list the fused layer twice
        self.offset, self.size = offset, size

    @property
    def fused_parent(self) -> nn.Module:
        return self._parent[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.fused_parent.weight.narrow(0, self.offset, self.size)


def diffusers_name_index(kmodel, key_map: Mapping[str, object]) -> dict[str, nn.Module]:
    """``{lora name: layer or RowSlice}`` from a Forge LoRA key map (``model_lora_keys_unet``):
    values are ``"diffusion_model.<path>.weight"``, ``(that key, (dim, offset, size))`` or, for weights
    Forge reorders on load, ``(key, piece, function)``, which are skipped."""
    modules = dict(kmodel.named_modules())
    index = {}
    for name, target in key_map.items():
        if isinstance(target, str):
            key, piece = target, None
        elif len(target) > 2 and target[2] is not None:
            continue  # a weight Forge transforms on load (swap_scale_shift): not a plain LoRA target
        else:
            key, piece = target[0], target[1]
        if not key.endswith(".weight"):
            continue
        layer = modules.get(key[: -len(".weight")])
        if layer is None:
            continue
        if piece is None:
            index[name] = layer
        elif piece[0] == 0:
            index[name] = RowSlice(layer, piece[1], piece[2])
    return index


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
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "output_padding",
            "transposed",
        ):
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


class _SliceView(nn.Linear):
    """The ``nn.Linear`` face of a :class:`RowSlice` for :class:`OnlineTSM`: its own output is zero, so
    once wrapped it returns only the LoRA output for those rows."""

    def __init__(self, in_features: int, size: int, device, dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, size
        self.weight = torch.empty(0, device=device, dtype=dtype)
        self.bias = None

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _views(tensors: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], device, dtype) -> dict[str, nn.Module]:
    views = {}
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d):
            views[name] = _Conv2dView(layer, device, dtype)
            continue
        down, up = first_factor(tensors, name, "lora_down"), first_factor(tensors, name, "lora_up")
        if down.dim() != 2:
            raise TSMFileError(f"{name}: a conv LoRA for a Linear layer")
        if isinstance(layer, RowSlice):
            views[name] = _SliceView(down.shape[1], layer.size, device, dtype)
        else:
            views[name] = _LinearView(layer, down.shape[1], up.shape[0], device, dtype)
    return views


class _OnlineOnForge:
    """:class:`OnlineTSM` on views of Forge layers; the Forge layers' forward is redirected to the
    TSM modules (fused layers: their output plus each slice's LoRA output in its rows), and put back
    by :meth:`restore`. No weight is ever written."""

    def __init__(self, f: SessionFile, device, dtype):
        self.device = torch.device(device)
        self.views = _views(f.tensors, f.layers, device, dtype)
        self.online = OnlineTSM(f.tensors, f.metadata, self.views, f.multiplier, f.path)
        self.patched: dict[nn.Module, object] = {}  # layer -> its previous instance-level forward (or None)
        slices: dict[nn.Module, list] = {}
        for name, layer in f.layers.items():
            if isinstance(layer, RowSlice):
                slices.setdefault(layer.fused_parent, []).append((layer.offset, layer.size, self.views[name]))
            else:
                self.patched[layer] = self.views[name]._previous
                layer.forward = self.views[name].forward  # now the TSM module's forward (OnlineTSM.apply_to)
        for parent, pieces in slices.items():
            self.patched[parent] = previous = parent.__dict__.get("forward")
            parent.forward = self._fused_forward(parent, previous, pieces)

    @staticmethod
    def _fused_forward(parent, previous, pieces):
        def forward(x, *args, **kwargs):
            out = (
                previous(x, *args, **kwargs)
                if previous is not None
                else type(parent).forward(parent, x, *args, **kwargs)
            )
            out = out.clone()
            for offset, size, view in pieces:
                out[..., offset : offset + size] += view(x).to(out.dtype)
            return out

        return forward

    def set_timestep(self, t, batch_size=None):
        self.online.set_timestep(t, batch_size)

    def to_device(self, device: torch.device) -> None:
        if device != self.device:
            for m in self.online.modules.values():
                m.to(device)
            self.device = device

    def restore(self) -> None:
        for layer, previous in self.patched.items():
            if previous is not None:
                layer.forward = previous
            else:
                layer.__dict__.pop("forward", None)
        self.patched.clear()
        self.online.restore()


# ----------------------------------------------------------------------------------------------
# one sampling run on one UNet
# ----------------------------------------------------------------------------------------------
class ForgeSession(SamplingSession):
    """The TSM files of one sampling run on Forge's diffusion model: a forward pre-hook on
    ``diffusion_model`` hands every call's t to the shared :class:`SamplingSession` policy.

    Weights may be inference tensors (Forge's ``LoraLoader.refresh`` runs under
    ``torch.inference_mode``), writable only inside inference mode: every write uses it.
    """

    def __init__(self, files: Sequence[SessionFile], kmodel, device="cpu", dtype=torch.float32):
        self.hook = None
        Ts = {check_tsm_metadata(f.metadata, f.path)["num_train_timesteps"] for f in files}
        if len(Ts) > 1:
            raise TSMFileError(f"[TSM] files with different num_train_timesteps {sorted(Ts)} in one generation")
        self.T = Ts.pop() if Ts else 1000
        super().__init__(
            files, make_online=lambda f: _OnlineOnForge(f, device, dtype), weight_writes=torch.inference_mode
        )
        self.predictor = kmodel.predictor
        self.hook = kmodel.diffusion_model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        unet_t = args[1] if len(args) > 1 else kwargs.get("timesteps", kwargs.get("timestep"))
        for run in self.runs:
            if not run.merge and hasattr(run.runtime, "to_device"):
                run.runtime.to_device(x.device)
        self.set_timestep(unet_input_to_t(self.predictor, unet_t, self.T), x.shape[0])

    def restore(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        super().restore()


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


def apply_to_unet(
    unet_patcher,
    requests: Iterable[TSMRequest],
    layer_index: Mapping[str, nn.Module] | None = None,
    loader: Callable[[str], tuple[dict, dict]] = load_cached,
    key_map: Mapping[str, object] | None = None,
) -> ForgeSession | None:
    """Start a :class:`ForgeSession` on Forge's UnetPatcher's diffusion model for one sampling run.

    The policy (``tsm_trainer.runtime.sampling_session``): the first fostered file on writable weights merges,
    files on quantized weights (or non-float ``storage_dtype``), assembled files, ``mode=online`` and
    every further file run online. ``key_map``: Forge's ``model_lora_keys_unet`` map, for files with
    diffusers names (Flux/SD3 ``lora_transformer_...``). Call ``restore()`` when sampling ends.

    Returns:
        the session (iterating it gives each file's run), or None when no request applies.
    """
    model = unet_patcher.model  # KModel (backend/modules/k_model.py)
    index = forge_layer_index(model.diffusion_model) if layer_index is None else dict(layer_index)
    if key_map:
        index.update({k: v for k, v in diffusers_name_index(model, key_map).items() if k not in index})
    device = getattr(unet_patcher, "load_device", None) or torch.device("cpu")
    dtype = getattr(model, "computation_dtype", torch.float32)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    # extensions-builtin/sd_forge_lora/networks.py: online LoRA only for non fp32/fp16/bf16 storage.
    storage_float = getattr(model, "storage_dtype", torch.float32) in FLOAT_STORAGE
    files = []
    for req in requests:
        if req.unet_multiplier == 0:
            continue
        tensors, metadata = loader(req.path)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te")}
        names = module_names(tensors)
        if not names:
            continue
        mode = req.mode
        if not storage_float:
            if mode == "merge":
                raise TSMFileError(
                    f"{req.path}: mode=merge is impossible: this model's weights are stored as "
                    f"{getattr(model, 'storage_dtype', '?')}; use mode=auto or mode=online"
                )
            mode = "online"
        files.append(
            SessionFile(tensors, metadata, resolve_layers(names, index, req.path), req.unet_multiplier, req.path, mode)
        )
    if not files:
        return None
    return ForgeSession(files, model, device, dtype)


def apply_text_encoder(
    clip,
    requests: Iterable[TSMRequest],
    key_map_fn: Callable,
    load_lora_fn: Callable,
    loader: Callable[[str], tuple[dict, dict]] = load_cached,
):
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
            warnings.warn(
                f"[TSM] {req.path}: {len(unmatched)} text-encoder key(s) not in this model, e.g. {list(unmatched)[:3]}",
                stacklevel=2,
            )
        patched.add_patches(
            filename=f"tsm:{req.path}",
            patches=patches,
            strength_patch=req.te_multiplier,
            strength_model=1.0,
            online_mode=False,
        )
    return clip if patched is None else patched


class Controller:
    """Lifecycle over Forge's processing object ``p`` (modules/processing.py):

    * extra network ``activate(p, params_list)``: resolve tags to files (stored on ``p``);
    * script ``process_batch``: text-encoder LoRA on ``p.sd_model.forge_objects.clip``
      (after ``forge_objects_after_applying_lora.shallow_copy()``, before ``p.setup_conds()``);
    * script ``process_before_every_sampling``: end any previous session (Forge calls this twice
      before a hires pass; the first session is replaced unused), then start one on
      ``p.sd_model.forge_objects.unet``;
    * script ``post_sample`` / ``postprocess``: :meth:`finish`: restore every weight and forward, warn
      if the UNet was never called, and put the session's notices in ``p.extra_generation_params``.
    """

    ATTR = "tsm_requests"

    def __init__(
        self,
        find_file: Callable[[str], str | None],
        key_map_fn: Callable | None = None,
        load_lora_fn: Callable | None = None,
        loader: Callable = load_cached,
        unet_key_map_fn: Callable | None = None,
    ):
        self.find_file = find_file
        self.key_map_fn = key_map_fn
        self.load_lora_fn = load_lora_fn
        self.unet_key_map_fn = unet_key_map_fn
        self.loader = loader
        self.session: ForgeSession | None = None
        self.notices: list[str] = []

    def activate(self, p, params_list) -> list[TSMRequest]:
        requests = []
        for params in params_list:
            name, unet, te, mode = parse_params(list(params.items))
            path = self.find_file(name)
            if path is None:
                raise TSMFileError(f"<tsm:{name}>: no such TSM file (looked for {name}.safetensors)")
            requests.append(TSMRequest(path, unet, te, mode))
        setattr(p, self.ATTR, requests)
        self.notices = []
        return requests

    def process_batch(self, p) -> None:
        requests = getattr(p, self.ATTR, None)
        if not requests or self.key_map_fn is None:
            return
        objects = p.sd_model.forge_objects
        objects.clip = apply_text_encoder(objects.clip, requests, self.key_map_fn, self.load_lora_fn, self.loader)

    def process_before_every_sampling(self, p) -> None:
        self.restore()  # a session replaced before it sampled is Forge's double call, not an error
        requests = getattr(p, self.ATTR, None)
        if not requests:
            return
        unet = p.sd_model.forge_objects.unet
        key_map = self.unet_key_map_fn(unet.model) if self.unet_key_map_fn is not None else None
        try:
            self.session = apply_to_unet(unet, requests, loader=self.loader, key_map=key_map)
        except Exception as e:
            # Forge's script runner prints and swallows this: say it in the image's info too.
            if hasattr(p, "extra_generation_params"):
                p.extra_generation_params["TSM error"] = f"not applied: {e}"
            raise

    def restore(self) -> None:
        """Undo the current session (weights bit for bit, forwards, the hook); keep its notices."""
        session, self.session = self.session, None
        if session is not None:
            self.notices += [n for n in session.notices if n not in self.notices]
            session.restore()

    def finish(self, p=None) -> None:
        """End of a generation: restore, report what happened in the output info."""
        session = self.session
        self.restore()
        if session is not None and session.calls == 0:
            warnings.warn("[TSM] the UNet was never called during sampling; no expert was applied", stacklevel=2)
        if p is not None and self.notices and hasattr(p, "extra_generation_params"):
            p.extra_generation_params["TSM notice"] = "; ".join(self.notices)
