"""`Load TSM LoRA` (MODEL, CLIP -> MODEL, CLIP): a TSM file in ComfyUI (docs/design.md section 6).

Thin adapter; the expert arithmetic and the weight handling are ``tsm_trainer.runtime.online``'s.

* Denoiser: the node returns a clone of the MODEL (``ModelPatcher.clone()``) carrying an
  ``APPLY_MODEL`` wrapper (``comfy/patcher_extension.py`` ``WrappersMP``), which
  ``BaseModel.apply_model`` runs around ``_apply_model`` at every denoiser call
  (``comfy/model_base.py``). The wrapper receives the sigma that ``_apply_model`` turns into the
  UNet's timestep with ``self.model_sampling.timestep(sigma)``; it does the same conversion,
  hands that t to the runtime and runs the model:

  Merge or online, backups, exact restore and errors follow the shared policy of
  ``tsm_trainer.runtime.sampling_session`` (as in the A1111 and Forge adapters): a fostered file on
  fp32/fp16/bf16 weights is merged (:class:`~tsm_trainer.runtime.online.ExpertSwitcher`, re-merged only
  when t crosses into another expert's interval); assembled files (routers), fp8 weights and
  mixed-interval batches run online (:class:`~tsm_trainer.runtime.online.OnlineTSM`; a mixed batch is
  logged). Any error while switching restores the weights, then stops the prompt with the message.

  The session is built at the first denoiser call of a sampling run (the weights are then on
  the device ComfyUI loaded them to) and undone by an ``ON_CLEANUP`` callback, which
  ``CFGGuider.outer_sample`` fires through ``ModelPatcher.cleanup()`` in a ``finally`` when
  sampling ends or fails (``comfy/samplers.py``). Between sampling runs the base model is exactly
  as it was (backups restored bit for bit), so ComfyUI can unload, reload or re-patch it freely.
* Text encoder: the file's static ``lora_te*`` LoRA goes through ComfyUI's normal LoRA path
  (``comfy.lora.model_lora_keys_clip`` + ``comfy.lora.load_lora`` + ``CLIP.clone().add_patches``,
  as ``comfy.sd.load_lora_for_models`` does).
"""

from __future__ import annotations

import logging
import os

import comfy.lora
import folder_paths
import torch
from comfy.patcher_extension import CallbacksMP, WrappersMP

from tsm_trainer.core.file_format import check_tsm_metadata, load_file
from tsm_trainer.core.lora_math import module_names
from tsm_trainer.files.export import text_encoder_lora
from tsm_trainer.runtime.online import resolve_layers, sgm_layer_index
from tsm_trainer.runtime.sampling_session import SamplingSession, SessionFile

WRAPPER_KEY = "tsm_trainer.load_tsm_lora"

log = logging.getLogger(__name__)


class TSMSampling:
    """The denoiser side of one `Load TSM LoRA` node: selects the expert per denoiser call.

    Args:
        tensors, metadata: the native file's content (``tsm_trainer.core.file_format.load_file``).
        strength: the user's multiplier for the denoiser.
        path: the file, for error messages.
    """

    def __init__(self, tensors, metadata, strength: float, path: str):
        self.info = check_tsm_metadata(metadata, path)
        self.tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te")}
        self.metadata = dict(metadata)
        self.names = module_names(self.tensors)
        self.strength = float(strength)
        self.path = path
        self.session: SamplingSession | None = None
        self.base_model = None

    # -- sigma -> t -------------------------------------------------------------------------
    def timestep(self, base_model, sigma: torch.Tensor) -> torch.Tensor:
        """t on the 0..T axis, as the denoiser receives it (docs/design.md sections 1 and 6)."""
        if self.info["timestep_space"] == "flow":
            # Flow models: t = sigma * T (ComfyUI's SD3 passes sigma*1000, Flux passes sigma).
            return sigma.detach().float() * self.info["num_train_timesteps"]
        return base_model.model_sampling.timestep(sigma).float()  # what _apply_model computes

    # -- the APPLY_MODEL wrapper ----------------------------------------------------------
    def apply_model(self, executor, x, t, *args, **kwargs):
        base_model = executor.class_obj  # the BaseModel whose apply_model is running
        session = self._session(base_model, x.device)
        notices = len(session.notices)
        session.set_timestep(self.timestep(base_model, t), x.shape[0])
        for notice in session.notices[notices:]:
            log.warning("[TSM] %s", notice)
        return executor(x, t, *args, **kwargs)

    def _session(self, base_model, device: torch.device) -> SamplingSession:
        if self.session is not None and self.base_model is base_model:
            return self.session
        self.restore()
        layers = resolve_layers(self.names, sgm_layer_index(base_model.diffusion_model), self.path)
        tensors = {k: v.to(device) for k, v in self.tensors.items()}
        self.session = SamplingSession([SessionFile(tensors, self.metadata, layers, self.strength, self.path)])
        self.base_model = base_model
        return self.session

    # -- the ON_CLEANUP callback ----------------------------------------------------------
    def cleanup(self, patcher=None) -> None:
        """End of a sampling run: the base weights back bit for bit, layer forwards unwrapped."""
        self.restore()

    def restore(self) -> None:
        session, self.session, self.base_model = self.session, None, None
        if session is not None:
            session.restore()


def patch_clip(clip, tensors, strength: float, path: str = "<file>"):
    """The file's static text-encoder LoRA through ComfyUI's normal LoRA path (a CLIP clone)."""
    te = text_encoder_lora(tensors)
    if clip is None or not te or strength == 0:
        return clip
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    loaded = comfy.lora.load_lora(te, key_map)
    new_clip = clip.clone()
    applied = set(new_clip.add_patches(loaded, strength))
    missing = [k for k in loaded if k not in applied]
    if missing or not loaded:
        log.warning(
            "%s: %d text-encoder module(s) not applied to this CLIP", path, len(missing) or len(module_names(te))
        )
    return new_clip


def patch_model(model, tensors, metadata, strength: float, path: str = "<file>"):
    """A clone of ``model`` whose denoiser calls select the expert of their t."""
    if strength == 0:
        return model
    if model.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        raise ValueError(
            f"{path}: this MODEL already went through a `Load TSM LoRA` node; one TSM file per model "
            "(plain LoRAs before or after it are fine)"
        )
    state = TSMSampling(tensors, metadata, strength, path)
    # Fail at the node, not mid-sampling, when the file doesn't fit this model.
    resolve_layers(state.names, sgm_layer_index(model.model.diffusion_model), path)
    patched = model.clone()
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, state.apply_model)
    patched.add_callback_with_key(CallbacksMP.ON_CLEANUP, WRAPPER_KEY, state.cleanup)
    return patched


def _full_path(name: str) -> str:
    get = getattr(folder_paths, "get_full_path_or_raise", None)
    if get is not None:
        return get("loras", name)
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(f"LoRA file {name!r} not found in the 'loras' folders")
    return path


class LoadTSMLoRA:
    """`Load TSM LoRA`: like ComfyUI's LoraLoader, for native TSM files (experts by timestep)."""

    def __init__(self):
        self.loaded = None  # (path, mtime, tensors, metadata)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the TSM LoRA will be applied to."}),
                "clip": ("CLIP", {"tooltip": "The CLIP model its text-encoder LoRA will be applied to."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A native TSM .safetensors file."}),
                "strength_model": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -100.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "How strongly to modify the diffusion model.",
                    },
                ),
                "strength_clip": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -100.0,
                        "max": 100.0,
                        "step": 0.01,
                        "tooltip": "How strongly to modify the CLIP model.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = (
        "The diffusion model, expert selected per step from the noise level.",
        "The CLIP model with the file's static text-encoder LoRA.",
    )
    FUNCTION = "load_tsm_lora"
    CATEGORY = "loaders"
    DESCRIPTION = (
        "TimeStep Master LoRA: the expert of each denoising step is chosen from "
        "model_sampling.timestep(sigma); assembled files run their routers."
    )

    def load_tsm_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = _full_path(lora_name)
        mtime = os.path.getmtime(path)
        if self.loaded is None or self.loaded[:2] != (path, mtime):
            self.loaded = None
            tensors, metadata = load_file(path)
            self.loaded = (path, mtime, tensors, metadata)
        tensors, metadata = self.loaded[2], self.loaded[3]
        check_tsm_metadata(metadata, path)
        return (
            patch_model(model, tensors, metadata, strength_model, path),
            patch_clip(clip, tensors, strength_clip, path),
        )


NODE_CLASS_MAPPINGS = {"LoadTSMLoRA": LoadTSMLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadTSMLoRA": "Load TSM LoRA"}
