"""Applying a native TSM file while a UI samples (docs/design.md section 6), without any UI import.

UI adapters hand over the model's layers by kohya name and, at every denoiser call, the
timestep the UNet receives (on the 0..T axis). Two paths:

* :class:`ExpertSwitcher` (stage-1 files, one scale, no router): the active expert is merged
  into the weights, and re-merged only when t crosses into another expert's interval, so a
  sampling run costs at most one merge per boundary crossed. Each merge starts from the
  backed-up base weights, so nothing drifts, and :meth:`restore` puts them back bit for bit.
* :class:`OnlineTSM` (assembled files with routers, or per-sample timesteps): the layers are
  wrapped by :class:`~tsm_trainer.core.modules.TSMLoRAModule` and compute core + gated context
  experts on the fly, exactly as in training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError, check_state_dict, check_tsm_metadata
from tsm_trainer.core.intervals import expert_index
from tsm_trainer.core.key_names import diffusers_lora_name_to_sgm
from tsm_trainer.core.lora_math import experts_in, lora_delta, module_names, module_ranks, split_key
from tsm_trainer.core.modules import LoRAModule, TSMLoRAModule
from tsm_trainer.core.timestep import TimestepContext


class MixedExpertsError(ValueError):
    """The samples of one denoiser call fall in different experts (a merge can hold only one)."""


def cpu_timesteps(t: torch.Tensor | float) -> torch.Tensor:
    """t as a (B,) float64 CPU tensor, moved off the device *before* the float64 cast: MPS has no
    float64 ("Cannot convert a MPS Tensor to float64 dtype"), so ``as_tensor(t, dtype=float64)``
    on an MPS tensor raises."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).reshape(-1)
    return torch.tensor([float(t)], dtype=torch.float64)


def sgm_layer_index(diffusion_model: nn.Module, prefix: str = "lora_unet") -> dict[str, nn.Module]:
    """``{kohya name: layer}`` of a UNet in the original layout (A1111/Forge/ComfyUI hold
    ``input_blocks...``), for every Linear and Conv2d."""
    return {
        f"{prefix}_{path.replace('.', '_')}": m
        for path, m in diffusion_model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def resolve_layers(names: list[str], index: Mapping[str, nn.Module], path: str = "<file>") -> dict[str, nn.Module]:
    """Map a file's module names to layers, trying the SGM translation of SD1/SD2 names.

    Raises:
        TSMFileError: naming the file and the modules the model doesn't have.
    """
    layers, missing = {}, []
    for name in names:
        layer = index.get(name)
        if layer is None:
            layer = index.get(diffusers_lora_name_to_sgm(name))
        if layer is None:
            missing.append(name)
        else:
            layers[name] = layer
    if missing:
        raise TSMFileError(
            f"{path}: {len(missing)} module(s) not in this model (a file for another base model?), e.g. {missing[:3]}"
        )
    return layers


def merge_blocker(info: Mapping) -> str:
    """Why :class:`ExpertSwitcher` cannot merge a file of this (checked) metadata, "" when it can:
    only a fostered file with one scale (no router) has one expert per t."""
    if info["stage"] != "foster":
        return "an assembled file (routers) runs online"
    if len(info["scales"]) != 1:
        return f"a file with {len(info['scales'])} scales runs online"
    return ""


class ExpertSwitcher:
    """Stage-1 fast path: the expert of the current t merged into the weights.

    Args:
        tensors, metadata: the native file's content (``tsm_trainer.core.file_format.load_file``).
        layers: ``{kohya name: layer}`` for every module of the file (text encoder included,
            or leave those out when the UI applies the static text-encoder LoRA itself).
        multiplier: the user's strength.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        layers: Mapping[str, nn.Module],
        multiplier: float = 1.0,
        path: str = "<file>",
    ):
        info = check_tsm_metadata(metadata, path)
        if merge_blocker(info):
            raise TSMFileError(f"{path}: ExpertSwitcher takes fostered files (one scale, no router); use OnlineTSM")
        self.n = info["scales"][0]
        self.num_train_timesteps = info["num_train_timesteps"]
        self.experts = experts_in(tensors)[self.n]
        self.tensors = tensors
        self.layers = dict(layers)
        self.multiplier = multiplier
        self.path = path
        self.active: int | None = None
        self.merges = 0
        self._backup: dict[str, torch.Tensor] = {}
        self._written: dict[str, tuple] = {}  # fingerprint of each weight as we last wrote it
        self.rebased: list[str] = []  # modules whose weight the host re-wrote under us (not restored)
        self._static = [n for n in module_names(tensors) if n.startswith("lora_te") and n in self.layers]
        self._expert_modules = [n for n in module_names(tensors) if not n.startswith("lora_te")]
        missing = [n for n in self._expert_modules if n not in self.layers]
        if missing:
            raise TSMFileError(f"{path}: no layer given for {len(missing)} module(s), e.g. {missing[:3]}")
        for key, value in tensors.items():  # fail now, not in a merge mid-sampling
            name = split_key(key)[0]
            if name in self.layers and key.endswith("lora_down.weight"):
                weight = self.layers[name].weight
                if tuple(value.shape[1:]) != tuple(weight.shape[1:]):
                    raise TSMFileError(
                        f"{path}: key {key!r} has shape {tuple(value.shape)}, which does not fit the "
                        f"layer's weight {tuple(weight.shape)}"
                    )
            elif (
                name in self.layers
                and key.endswith("lora_up.weight")
                and value.shape[0] != self.layers[name].weight.shape[0]
            ):
                raise TSMFileError(
                    f"{path}: key {key!r} has shape {tuple(value.shape)}, which does not fit the "
                    f"layer's weight {tuple(self.layers[name].weight.shape)}"
                )

    def expert_for(self, t: torch.Tensor | float) -> int:
        """The expert of t (all samples of a call must share it: UIs pass one sigma per step)."""
        idx = expert_index(cpu_timesteps(t), self.n, self.num_train_timesteps)
        if bool((idx != idx[0]).any()):
            raise MixedExpertsError(
                f"{self.path}: samples of one call fall in different experts {idx.tolist()}; "
                "use OnlineTSM for per-sample timesteps"
            )
        return int(idx[0])

    def set_timestep(self, t: torch.Tensor | float) -> int:
        """Make the expert of t active; merges only when it changes (or when the host re-wrote some of
        the merged weights since: see :meth:`_rewritten`). Returns the expert."""
        e = self.expert_for(t)
        if e != self.active:
            if e not in self.experts:
                raise TSMFileError(
                    f"{self.path}: t={float(cpu_timesteps(t)[0])} needs expert {e} "
                    f"of scale {self.n}, which the file does not hold ({self.experts})"
                )
            self._merge(e)
        else:
            # per call only the cheap check (no device sync): a new Parameter object or storage
            for name in self._rewritten(self._expert_modules, values=False):
                self._set(name, self._expert_delta(name, e))
        return e

    def _expert_delta(self, name: str, e: int) -> torch.Tensor:
        return lora_delta(self.tensors, name, f"{name}.tsm.{self.n}.{e}")

    @staticmethod
    def _fingerprint(weight: torch.Tensor) -> tuple:
        """What identifies the tensor we last wrote: its storage (not the Python object: a row slice of a
        fused layer is a fresh view at each access) and 64 strided values (inference tensors have no
        version counter)."""
        flat = weight.detach().reshape(-1)
        return weight.device, weight.data_ptr(), flat[:: max(1, flat.numel() // 64)][:64].clone()

    def _rewritten(self, names, values: bool = True) -> list[str]:
        """Modules whose weight the host replaced or re-wrote since our last write (ComfyUI's
        ``unpatch_model`` / ``partially_unload`` put their own backups back, by copy or by a new
        Parameter); their current value is the host's base now."""
        out = []
        for name in names:
            mark = self._written.get(name)
            if mark is not None:
                weight = self.layers[name].weight
                now = self._fingerprint(weight) if values else (weight.device, weight.data_ptr())
                if now[:2] != mark[:2] or (values and not torch.equal(now[2], mark[2])):
                    out.append(name)
        return out

    def _set(self, name: str, delta: torch.Tensor | None) -> None:
        weight = self.layers[name].weight
        if name in self._backup and name in self._rewritten([name]):
            del self._backup[name]  # the host's new base replaces ours
            if delta is None:  # restoring: the host already put its base back
                self._written.pop(name, None)
                self.rebased.append(name)
                return
        if name not in self._backup:
            self._backup[name] = weight.detach().clone()
        base = self._backup[name]
        with torch.no_grad():
            if delta is None:
                weight.copy_(base)
            else:
                weight.copy_((base.float() + self.multiplier * delta.to(base.device)).to(weight.dtype))
        self._written[name] = self._fingerprint(weight)

    def _merge(self, e: int) -> None:
        for name in self._expert_modules:
            self._set(name, self._expert_delta(name, e))
        if self.active is None:  # the static text-encoder LoRA, once
            for name in self._static:
                self._set(name, lora_delta(self.tensors, name))
        self.active = e
        self.merges += 1

    def restore(self) -> None:
        """Put every touched weight back exactly as it was (weights the host re-wrote meanwhile keep
        the host's value: see :meth:`_rewritten`)."""
        for name in list(self._backup):
            self._set(name, None)
        self._backup.clear()
        self._written.clear()
        self.active = None


class OnlineTSM:
    """Any TSM file (routers included), computed on the fly by wrapping the layers.

    Args as :class:`ExpertSwitcher`. Call :meth:`set_timestep` before each denoiser call.

    Why not :meth:`tsm_trainer.core.network.TSMNetwork.from_file`: that builder walks a whole
    diffusers or sd-scripts model and names its layers by the model family; a UI hands over
    ``{kohya name: layer}`` of its own layout instead (SGM names, Forge's Linear views, row slices of
    fused qkv layers) with no family to detect, applies the text-encoder LoRA itself, may hold fp8
    weights (the factors then compute in float32), sets t from its sigma rather than from a hook on
    the denoiser, and may load a file holding only some experts (the UI names the missing one when
    sampling reaches it). Both read the file the same way (``lora_math.module_ranks``, the same
    module classes, ``check_state_dict``); only how layers are found and t is set differs.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        layers: Mapping[str, nn.Module],
        multiplier: float = 1.0,
        path: str = "<file>",
    ):
        info = check_tsm_metadata(metadata, path)
        self.context = TimestepContext(info["num_train_timesteps"])
        mixture = info["mixture"] if info["stage"] == "assemble" else None
        held = experts_in(tensors)
        ranks = module_ranks(tensors)
        self.modules: dict[str, nn.Module] = {}
        for name in module_names(tensors):
            if name not in layers:
                if name.startswith("lora_te"):
                    continue  # the UI applies the static text-encoder LoRA itself
                raise TSMFileError(f"{path}: no layer given for module {name}")
            if name not in ranks:
                raise TSMFileError(f"{path}: module {name} has no lora_down weight")
            rank = ranks[name]
            if name.startswith("lora_te"):
                module = LoRAModule(name, layers[name], rank, None, multiplier=multiplier)
            else:
                module = TSMLoRAModule(
                    name,
                    layers[name],
                    self.context,
                    info["scales"],
                    rank,
                    None,
                    experts=held,
                    mixture=mixture,
                    multiplier=multiplier,
                )
            weight = layers[name].weight
            # fp8/quantized weights: the factors compute in float32 (the output is cast back to the layer's)
            module.to(
                weight.device,
                weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32,
            )
            self.modules[name] = module
        expected = {f"{n}.{k}": v.shape for n, m in self.modules.items() for k, v in m.state_dict().items()}
        mine = {k: v for k, v in tensors.items() if split_key(k)[0] in self.modules}
        check_state_dict(expected, mine, path)
        with torch.no_grad():
            for n, m in self.modules.items():
                own = m.state_dict()
                for k in own:
                    own[k].copy_(mine[f"{n}.{k}"])
                m.eval()
                m.apply_to()

    def set_timestep(self, t: torch.Tensor | float, batch_size: int | None = None) -> None:
        self.context.set(cpu_timesteps(t), batch_size)

    def restore(self) -> None:
        for m in self.modules.values():
            m.remove()
        self.modules.clear()
