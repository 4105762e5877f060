"""One ``<tsm:...>`` activation (:class:`TSMSession`) and the extra network around it
(:class:`TSMExtraNetworkCore`, mixed into A1111's ``ExtraNetwork`` by ``scripts/tsm_extension.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata
from tsm_trainer.runtime.online import OnlineTSM, resolve_layers
from tsm_trainer.runtime.sampling_session import choose_path

from .adapter import (
    FileCache,
    LoraHost,
    find_tsm_files,
    parse_params,
    text_encoder_layer_index,
    timestep_from_sigma,
    unet_layer_index,
)
from .lora_network import TSMSamplingError, build_network, module_names, unet_module_names
from .online import UNetTimestepHook


def _text_encoder_module(sd_model) -> nn.Module | None:
    """The module A1111 calls to compute conds: SDXL ``conditioner``, else ``cond_stage_model``."""
    if getattr(sd_model, "is_sdxl", False) and isinstance(getattr(sd_model, "conditioner", None), nn.Module):
        return sd_model.conditioner
    cond = getattr(sd_model, "cond_stage_model", None)
    return cond if isinstance(cond, nn.Module) else None


class TSMSession:
    """Everything one ``activate`` set up, undone by :meth:`restore`.

    Every file becomes a network of the built-in Lora extension (``lora_network.build_network``):
    its text-encoder LoRA and, for a fostered file, the expert of the current t, set from
    ``on_cfg_denoiser``. An assembled file's UNet part runs online (layers wrapped, t from the
    UNet call). The networks are (re)appended to ``networks.loaded_networks`` before the text
    encoder and before every denoiser call: Lora's own ``activate`` rebuilds that list, and may
    run after this one.

    Args:
        files: ``[(label, path, tensors, metadata, multiplier)]``.
        sd_model: A1111's ``shared.sd_model`` (``.model.diffusion_model``, text encoders).
        lora: the built-in Lora extension's modules.
    """

    def __init__(self, files: Sequence[tuple[str, str, dict, dict, float]], sd_model, lora: LoraHost):
        self.lora = lora
        self.nets: list = []
        self.online: list[tuple[OnlineTSM, UNetTimestepHook | None]] = []
        self.calls: list[tuple[float, int]] = []  # (t the UNet receives, merged expert), for logs/tests
        self._touched: dict[int, nn.Module] = {}
        self._hook = None
        unet_index = te_index = None
        try:
            for label, path, tensors, metadata, multiplier in files:
                info = check_tsm_metadata(metadata, path)
                names = module_names(tensors)
                te_names = [n for n in names if n.startswith("lora_te")]
                if unet_index is None:
                    unet_index = unet_layer_index(sd_model)
                layers = resolve_layers(unet_module_names(tensors), unet_index, path)
                te_layers = {}
                if te_names:
                    te_index = text_encoder_layer_index(sd_model) if te_index is None else te_index
                    missing = [n for n in te_names if n not in te_index]
                    if missing:
                        raise TSMFileError(
                            f"{path}: {len(missing)} text-encoder module(s) not in this model, e.g. {missing[:3]}"
                        )
                    te_layers = {n: te_index[n] for n in te_names}
                # Lora merges (layers=None): one decision for all adapters, but A1111 has no mode
                # and a mixed-expert call is an error rather than a switch to online (Lora holds the merge)
                fostered, _ = choose_path(metadata, None, path=path)
                net = build_network(
                    lora.network, label, path, tensors, info, multiplier, layers if fostered else None, te_layers
                )
                self.nets.append(net)
                for layer in [*(layers.values() if fostered else ()), *(m for m, _ in te_layers.values())]:
                    self._touched[id(layer)] = layer
                if not fostered:
                    unet_tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_te")}
                    online = OnlineTSM(unet_tensors, metadata, layers, multiplier, path)
                    self.online.append((online, None))  # listed first: restore() unwraps it if the hook fails
                    self.online[-1] = (online, UNetTimestepHook(sd_model.model.diffusion_model, online.context))
            te = _text_encoder_module(sd_model)
            if te is not None:
                self._hook = te.register_forward_pre_hook(lambda module, args: self.ensure_loaded())
            self.ensure_loaded()
        except BaseException:
            self.restore()
            raise

    def ensure_loaded(self) -> None:
        """Append this session's networks to Lora's ``loaded_networks`` where missing."""
        loaded = self.lora.networks.loaded_networks
        for net in self.nets:
            if not any(x is net for x in loaded):
                loaded.append(net)

    def on_cfg_denoiser(self, params) -> None:
        """``script_callbacks.on_cfg_denoiser``: make the expert of this call's t active.

        An error is raised here (A1111 prints it) and also kept in the network's state, whose key
        change makes the next layer forward raise it through ``calc_updown``: the generation stops.
        """
        self.ensure_loaded()
        for net in self.nets:
            state = net.tsm_state
            if state is None:
                continue
            try:
                t = timestep_from_sigma(
                    params.sigma, getattr(params, "denoiser", None), state.timestep_space, state.num_train_timesteps
                )
                expert = state.set_timestep(t)
                self.calls.append((float(torch.as_tensor(t).detach().to("cpu").reshape(-1)[0]), expert))
            except Exception as e:
                state.fail(e)
                raise state.error from e
            finally:
                net.dyn_dim = state.key

    def restore(self) -> None:
        """Unwrap online layers, take the networks out of Lora's list and let Lora re-merge the layers
        they touched (back to the base weights plus the prompt's own LoRAs) right away."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for online, hook in reversed(self.online):
            if hook is not None:
                hook.remove()
            online.restore()
        self.online = []
        loaded = self.lora.networks.loaded_networks
        loaded[:] = [x for x in loaded if not any(x is net for net in self.nets)]
        self.nets = []
        with torch.no_grad():
            for layer in self._touched.values():
                self.lora.networks.network_apply_weights(layer)
        self._touched = {}


class TSMExtraNetworkCore:
    """``ExtraNetwork("tsm")`` logic.

    Args:
        models_dir: the folder of TSM files (``models/TSM`` or ``--tsm-dir``).
        get_sd_model: returns ``shared.sd_model``.
        lora: returns the built-in Lora extension's modules (raises when it is not loaded).
        default_multiplier: returns ``opts.extra_networks_default_multiplier``.
    """

    def __init__(
        self,
        models_dir: Callable[[], str] | str,
        get_sd_model: Callable[[], object],
        lora: Callable[[], LoraHost],
        default_multiplier: Callable[[], float] = lambda: 1.0,
    ):
        self._models_dir = models_dir if callable(models_dir) else (lambda: models_dir)
        self.get_sd_model = get_sd_model
        self.get_lora = lora
        self.default_multiplier = default_multiplier
        self.cache = FileCache()
        self.session: TSMSession | None = None
        self.available: dict[str, str] = {}
        self._failure = None  # (p, error, hook handle): an activation that failed stops the generation

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
            raise TSMFileError(
                f"<tsm:{name}>: no TSM file named {name!r} in {self.models_dir} (a .safetensors with tsm.* metadata)"
            )
        return path

    def activate(self, p, params_list) -> None:
        """Each call replaces the previous one; a generation that failed before ``deactivate`` is also
        cleaned up here. A1111 only prints an exception raised here and then calls ``activate(p, [])``,
        so a failure is kept for this ``p`` and raised by a UNet pre-hook: the generation stops with it."""
        if not params_list and self._failure is not None and self._failure[0] is p:
            return
        self.deactivate(p)
        try:
            entries = parse_params(params_list, self.default_multiplier())
            if not entries:
                return
            files = []
            for name, multiplier in entries:
                path = self._path(name)
                tensors, metadata, _ = self.cache.get(path)
                files.append((name, path, tensors, metadata, multiplier))
            self.session = TSMSession(files, self.get_sd_model(), self.get_lora())
        except Exception as e:
            self._fail(p, e)
            raise
        extra = getattr(p, "extra_generation_params", None)
        if isinstance(extra, dict):
            extra["TSM"] = ", ".join(f"{name}: {multiplier:g}" for name, multiplier in entries)

    def _fail(self, p, error: Exception) -> None:
        def stop(module, args):
            raise TSMSamplingError(f"sd-webui-tsm: {error}")

        try:
            unet = self.get_sd_model().model.diffusion_model
        except AttributeError:
            return
        self._failure = (p, error, unet.register_forward_pre_hook(stop))

    def deactivate(self, p=None) -> None:
        if self._failure is not None:
            self._failure[2].remove()
            self._failure = None
        session, self.session = self.session, None
        if session is not None:
            session.restore()

    def on_cfg_denoiser(self, params) -> None:
        if self.session is not None:
            self.session.on_cfg_denoiser(params)

    def forget(self, *_args) -> None:
        """``on_model_loaded``: another checkpoint is active (refiner, hires checkpoint, model switch).
        The session ends; Lora's backups live on each model's own layers, so a cached model gets its
        base weights back from them (now, and again at its next forward)."""
        TSMExtraNetworkCore.deactivate(self)
