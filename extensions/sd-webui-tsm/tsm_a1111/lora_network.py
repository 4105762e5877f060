"""A TSM file as a network of A1111's built-in Lora extension (``extensions-builtin/Lora``).

Lora merges lazily: each patched ``Linear``/``Conv2d``/``MultiheadAttention`` forward calls
``networks.network_apply_weights(layer)``, which compares the layer's ``network_current_names``
with ``tuple((net.name, net.te_multiplier, net.unet_multiplier, net.dyn_dim) for net in
networks.loaded_networks)`` and, when they differ, copies its own CPU backup back and adds
``module.calc_updown(weight)`` of every loaded network that has a module for the layer.

A TSM file becomes one such network (:func:`build_network`): its text-encoder LoRA as plain
modules, and, for fostered files, one module per UNet layer whose ``calc_updown`` is the delta of
the *active expert*. The active expert rides in ``dyn_dim`` (the one field of the key that Lora
only reads in modules it creates itself), so setting it makes Lora re-merge every touched layer
at its next forward, exactly as loractl's per-step multipliers do. TSM then never writes a
weight: backups, device moves (medvram/lowvram), fp8 and the checkpoint cache are Lora's, and
Lora's backup can never hold a TSM expert.

Errors during sampling never pass silently: A1111 prints and ignores exceptions raised in
``on_cfg_denoiser``, and Lora counts (and reports in the infotext) a ``RuntimeError`` from
``calc_updown``. So :meth:`ExpertState.fail` records the error and changes the key; the next
layer forward calls ``calc_updown``, which raises :class:`TSMSamplingError` (not a
``RuntimeError``), and the generation stops with the message.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError
from tsm_trainer.core.intervals import expert_index
from tsm_trainer.core.lora_math import experts_in, module_names, pair_delta

QKV = ("_q_proj", "_k_proj", "_v_proj")


class TSMSamplingError(Exception):
    """Stops a generation (deliberately not a ``RuntimeError``, which Lora would only count)."""


class ExpertState:
    """The expert a fostered network merges, shared by its modules.

    ``key`` is what goes into Lora's ``dyn_dim``: it changes whenever the merged weights must.
    """

    def __init__(self, label: str, n: int, num_train_timesteps: int, experts: list[int], timestep_space: str = "ddpm"):
        self.label, self.n, self.num_train_timesteps, self.experts = label, n, num_train_timesteps, experts
        self.timestep_space = timestep_space
        self.expert: int | None = None
        self.error: Exception | None = None
        self._failures = 0

    @property
    def key(self):
        if self.error is not None:
            return ("tsm-error", self._failures)
        return ("tsm", self.n, self.expert)

    def set_timestep(self, t: torch.Tensor) -> int:
        """Make the expert of ``t`` (the timesteps of one denoiser call) active. ``t`` is moved to
        the CPU before the float64 interval lookup (MPS has no float64)."""
        t = torch.as_tensor(t).detach().to("cpu").reshape(-1)
        idx = expert_index(t.to(torch.float64), self.n, self.num_train_timesteps)
        if bool((idx != idx[0]).any()):
            raise TSMSamplingError(
                f"<tsm:{self.label}>: the samples of one denoiser call fall in different "
                f"experts {sorted(set(idx.tolist()))} (t = {t.tolist()}); a fostered file merges "
                "one expert per call"
            )
        e = int(idx[0])
        if e not in self.experts:
            raise TSMSamplingError(
                f"<tsm:{self.label}>: t = {float(t[0]):.1f} needs expert {e} of scale {self.n}, "
                f"which the file does not hold (it holds {self.experts}); lower the denoising "
                "strength or use a file with every expert"
            )
        self.expert, self.error = e, None
        return e

    def fail(self, error: Exception) -> None:
        self.error = error if isinstance(error, TSMSamplingError) else TSMSamplingError(f"<tsm:{self.label}>: {error}")
        self._failures += 1

    def reset(self) -> None:
        self.expert, self.error = None, None


class _Pair:
    """One LoRA's factors (CPU, as loaded) and its delta on the weight's device, float32."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None):
        self.down, self.up = down, up
        self.scale = (alpha if alpha is not None else down.shape[0]) / down.shape[0]
        self._device: tuple | None = None

    def delta(self, device: torch.device) -> torch.Tensor:
        """(alpha/r) B A in the weight's layout, computed on ``device`` (factors copied there once)."""
        if self._device is None or self._device[0] != device:
            self._device = (device, self.down.to(device, torch.float32), self.up.to(device, torch.float32))
        _, down, up = self._device
        return pair_delta(down, up, self.scale)


def _pair(tensors: Mapping[str, torch.Tensor], prefix: str, name: str) -> _Pair:
    alpha = tensors.get(f"{name}.alpha")
    return _Pair(
        tensors[f"{prefix}.lora_down.weight"],
        tensors[f"{prefix}.lora_up.weight"],
        None if alpha is None else float(alpha),
    )


@functools.cache
def _module_classes(base: type):
    """Subclasses of the running webui's ``network.NetworkModule`` (one set per base class)."""

    class _TSMModule(base):
        def _finish(self, delta: torch.Tensor, target: torch.Tensor):
            # finalize_updown applies the te/unet multiplier (alpha/r is already in the delta: scale
            # and dim stay None, so calc_scale() is 1) and reshapes as Lora does for its own modules.
            return self.finalize_updown(delta, target, delta.shape)

    class StaticModule(_TSMModule):
        """A text-encoder LoRA module (one pair; for OpenCLIP q/k/v: rows of ``in_proj_weight``)."""

        def __init__(self, net, weights, pair: _Pair | None, rows: int | None = None):
            super().__init__(net, weights)
            self.pair, self.rows = pair, rows

        def calc_updown(self, target):
            if self.pair is None:  # q/k/v/out part the file does not train: Lora needs all four
                shape = (self.rows, *target.shape[1:]) if self.rows else target.shape
                return self._finish(torch.zeros(shape, device=target.device), target)
            return self._finish(self.pair.delta(target.device), target)

    class ExpertModule(_TSMModule):
        """A UNet layer of a fostered file: the delta of ``state.expert``."""

        def __init__(self, net, weights, pairs: dict[int, _Pair], state: ExpertState):
            super().__init__(net, weights)
            self.pairs, self.state = pairs, state

        def calc_updown(self, target):
            state = self.state
            if state.error is not None:
                raise state.error
            if state.expert is None:
                raise TSMSamplingError(
                    f"<tsm:{state.label}>: the UNet ran before any denoiser step set its timestep "
                    "(called outside A1111's CFG denoiser?)"
                )
            pair = self.pairs.get(state.expert)
            if pair is None:
                raise TSMSamplingError(
                    f"<tsm:{state.label}>: {self.network_key} has no expert {state.expert} "
                    f"(it has {sorted(self.pairs)}): the file is incomplete"
                )
            try:
                return self._finish(pair.delta(target.device), target)
            except torch.OutOfMemoryError as e:  # a half-merged model must not sample on
                raise TSMSamplingError(
                    f"<tsm:{state.label}>: out of memory merging expert {state.expert} into {self.sd_key}: {e}"
                ) from None

    return StaticModule, ExpertModule


def lora_key(layer: nn.Module, part: str | None = None) -> str:
    """The name Lora gave ``layer`` (``assign_network_names_to_compvis_modules`` on model load),
    plus ``_q_proj``/... for a row block of a ``MultiheadAttention``."""
    name = getattr(layer, "network_layer_name", None)
    if name is None:
        raise TSMFileError(
            f"{type(layer).__name__} layer has no network_layer_name: the built-in Lora extension has "
            "not named this model's layers (was the checkpoint loaded with Lora disabled?)"
        )
    return name + (part or "")


def build_network(
    network_mod,
    label: str,
    path: str,
    tensors: Mapping[str, torch.Tensor],
    info: dict,
    multiplier: float,
    unet_layers: Mapping[str, nn.Module] | None,
    te_layers: Mapping[str, tuple[nn.Module, str | None]],
):
    """A Lora ``network.Network`` for a TSM file.

    Args:
        network_mod: the webui's Lora ``network`` module.
        tensors, info: the file (``load_file``, ``check_tsm_metadata``).
        unet_layers: ``{kohya name: layer}`` of the UNet modules of a fostered file; None for an
            assembled file (its UNet part runs online).
        te_layers: ``{kohya name: (layer, part)}`` of its text-encoder modules; ``part`` is
            ``_q_proj``/``_k_proj``/``_v_proj`` for OpenCLIP's fused ``MultiheadAttention`` (layer).
    Returns:
        The network; ``net.tsm_state`` is its :class:`ExpertState` (None without UNet experts).
    """
    StaticModule, ExpertModule = _module_classes(network_mod.NetworkModule)
    net = network_mod.Network(f"tsm:{label}", SimpleNamespace(filename=path, shorthash="", name=label))
    net.te_multiplier = net.unet_multiplier = float(multiplier)
    net.mentioned_name = None  # no "Lora hashes" entry: the TSM infotext names the file
    net.tsm_state = None

    def weights(key, kohya, layer):
        return network_mod.NetworkWeights(network_key=kohya, sd_key=key, w={}, sd_module=layer)

    mha: dict[str, nn.Module] = {}
    for kohya, (layer, part) in te_layers.items():
        key = lora_key(layer, part)
        net.modules[key] = StaticModule(net, weights(key, kohya, layer), _pair(tensors, kohya, kohya))
        if part is not None:
            mha[lora_key(layer)] = layer
    for base, layer in mha.items():  # Lora merges a MultiheadAttention only when q, k, v and out all exist
        d = layer.embed_dim
        for part in (*QKV, "_out_proj"):
            if base + part not in net.modules:
                net.modules[base + part] = StaticModule(
                    net, weights(base + part, base + part, layer), None, d if part in QKV else None
                )
    if unet_layers:
        n = info["scales"][0]
        held = experts_in(tensors).get(n, [])
        state = net.tsm_state = ExpertState(label, n, info["num_train_timesteps"], held, info["timestep_space"])
        for kohya, layer in unet_layers.items():
            pairs = {
                e: _pair(tensors, f"{kohya}.tsm.{n}.{e}", kohya)
                for e in held
                if f"{kohya}.tsm.{n}.{e}.lora_down.weight" in tensors
            }
            key = lora_key(layer)
            net.modules[key] = ExpertModule(net, weights(key, kohya, layer), pairs, state)
    return net


def unet_module_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [n for n in module_names(tensors) if not n.startswith("lora_te")]
