"""TimeStep Master LoRA for kohya-ss sd-scripts: ``--network_module networks.tsm_lora``.

    accelerate launch train_network.py ... --network_module networks.tsm_lora \\
        --network_dim 4 --network_alpha 4 --network_args "tsm_scales=8"

A thin adapter: the network is :class:`tsm_trainer.TSMNetwork`; this file adds the method
names and call conventions sd-scripts' train_network.py and gen_img.py use.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# `networks` is a namespace package (no __init__.py), like sd-scripts' own `networks/`:
# with tsm-trainer installed (or on PYTHONPATH), both folders merge and this module imports
# from inside an unmodified sd-scripts checkout.
from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata, load_file, read_metadata
from tsm_trainer.core.metadata import kohya_metadata, modelspec_metadata
from tsm_trainer.core.network import TSMConfig, TSMNetwork
from tsm_trainer.core.network_args import parse_network_args
from tsm_trainer.core.targets import text_encoder_kind

NETWORK_MODULE = "networks.tsm_lora"
logger = logging.getLogger(__name__)


def _text_encoders(text_encoder, train_t5xxl: bool) -> list[nn.Module | None]:
    """sd-scripts passes one encoder, a list (SDXL, SD3, Flux) or None. T5 is trained only on request."""
    if text_encoder is None:
        return []
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    return [None if te is not None and text_encoder_kind(te) == "t5" and not train_t5xxl else te for te in encoders]


class TSMLoRANetwork(TSMNetwork):
    """:class:`TSMNetwork` with sd-scripts' network protocol."""

    def __init__(self, *args, network_args: dict[str, Any] | None = None, train_t5xxl: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.network_args = {k: str(v) for k, v in (network_args or {}).items()}
        self.train_t5xxl = train_t5xxl
        self.resolution: tuple[int, int] | None = None  # set by prepare_network

    # -- installation -------------------------------------------------------------------
    def apply_to(self, text_encoder, unet, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Install the wrappers; hook ``unet`` so its timestep argument routes the experts.

        Assembling with ``--network_train_unet_only`` keeps the text-encoder LoRA fostered in
        stage 1 (frozen, applied, saved): the assembled file must be the whole network.
        """
        carry = self.config.stage == "assemble" and not apply_text_encoder and bool(self.text_encoder_loras)
        if carry:
            logger.info(
                "networks.tsm_lora: carrying the fostered text-encoder LoRA (%d modules, frozen) into the "
                "assembled network although --network_train_unet_only is set",
                len(self.text_encoder_loras),
            )
        self.apply(text_encoder=apply_text_encoder or carry, denoiser=apply_unet)
        if apply_unet:
            self.attach(unet)

    # -- optimizer --------------------------------------------------------------------------
    def _param_groups(self, text_encoder_lrs: Sequence[float | None], unet_lr, default_lr):
        groups, descriptions = [], []

        def add(params, lr, description):
            lr = lr if lr is not None else default_lr
            if params and lr:  # like kohya: a group with no lr trains nothing
                group = {"params": params}
                if lr is not None:
                    group["lr"] = lr
                groups.append(group)
                descriptions.append(description)

        encoders = sorted({lora.lora_name.split("_", 2)[1] for lora in self.text_encoder_loras})  # te, te1, te3...
        for i, encoder in enumerate(encoders):
            params = [
                p
                for lora in self.text_encoder_loras
                if lora.lora_name.split("_", 2)[1] == encoder
                for p in lora.parameters()
                if p.requires_grad
            ]
            lr = text_encoder_lrs[min(i, len(text_encoder_lrs) - 1)] if text_encoder_lrs else None
            add(params, lr, "textencoder" if len(encoders) == 1 else f"textencoder {i + 1}")
        add(
            self.trainable_parameters(text_encoder=False),
            unet_lr,
            "unet routers" if self.config.stage == "assemble" else "unet experts",
        )
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        """Param groups as a plain list: what sd-scripts before v0.9 expects, and what later
        versions accept too (they take a tuple only as ``(groups, descriptions)``)."""
        lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        return self._param_groups(lrs, unet_lr, default_lr)[0]

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """sd-scripts >= v0.9: one lr per text encoder; returns ``(groups, descriptions)``."""
        lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        return self._param_groups(lrs, unet_lr, default_lr)

    def prepare_network(self, args) -> None:
        """sd-scripts calls this with its parsed arguments right after create_network, before the
        optimizer and the first step: the first point where the module sees them."""
        save_as = getattr(args, "save_model_as", "safetensors")
        if save_as != "safetensors":
            raise ValueError(
                f"--save_model_as {save_as}: TSM networks are saved as .safetensors only "
                "(use --save_model_as safetensors)"
            )
        resolution = getattr(args, "resolution", None)  # (w, h) after sd-scripts' prepare_dataset_args
        if isinstance(resolution, (tuple, list)) and len(resolution) == 2:
            self.resolution = tuple(int(v) for v in resolution)

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.set_stage_trainable()

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        """Forget the previous step's t, so a module reached without a fresh t fails loudly."""
        self.context.clear()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the timestep capture re-installs each call's t before autograd
        recomputes its checkpointed blocks (see tsm_trainer.core.timestep)."""

    def apply_max_norm_regularization(self, max_norm_value: float, device) -> tuple[int, float, float]:
        """kohya's scale_weight_norms, per expert: rescale B and A so ||scale * B A|| <= max_norm."""
        norms, keys_scaled = [], 0
        with torch.no_grad():
            for lora in self.all_loras:
                pairs = (
                    [(lora.lora_down, lora.lora_up)]
                    if not hasattr(lora, "tsm")
                    else [(p.lora_down, p.lora_up) for experts in lora.tsm.values() for p in experts.values()]
                )
                for down, up in pairs:
                    delta = lora.pair_delta(down.weight.to(device).float(), up.weight.to(device).float()) * lora.scale
                    norm = delta.norm().clamp(min=max_norm_value / 2)
                    desired = torch.clamp(norm, max=max_norm_value)
                    ratio = (desired / norm).sqrt()
                    if ratio.item() != 1:
                        keys_scaled += 1
                        down.weight.mul_(ratio.to(down.weight.dtype))
                        up.weight.mul_(ratio.to(up.weight.dtype))
                    norms.append(float(norm * ratio * ratio))
        return keys_scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)

    # -- files ------------------------------------------------------------------------------
    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the native TSM file (safetensors only) with ss_*, modelspec.*, tsm.* and sshs_* keys."""
        if not str(file).endswith(".safetensors"):
            raise ValueError(f"{file}: TSM networks are saved as .safetensors only (use --save_model_as safetensors)")
        name = os.path.splitext(os.path.basename(file))[0]
        meta = kohya_metadata(self.family, NETWORK_MODULE, self.config.rank, self.config.alpha, self.network_args, name)
        meta.update(modelspec_metadata(self.family, name, resolution=self.resolution))
        meta.update(metadata or {})  # what sd-scripts passes wins over our defaults...
        resolution = self.resolution or _datasets_resolution(meta.get("ss_datasets"))
        if resolution:  # ...except its resolution, a 512 guess when --resolution is only in --dataset_config
            meta["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
        self.save(file, dtype, meta)

    def load_weights(self, file: str, tensors=None, metadata=None) -> dict:
        return super().load_weights(file, tensors, metadata)

    # -- inference / merging ----------------------------------------------------------------
    def is_mergeable(self) -> bool:
        """Only a network that doesn't depend on t (one expert, no router) merges into static weights."""
        return self.is_static()

    def merge_to(self, text_encoder, unet, weights_sd, dtype=None, device=None) -> None:
        if weights_sd is not None:
            own = self.state_dict()
            with torch.no_grad():
                for key, value in weights_sd.items():
                    if key not in own:
                        raise TSMFileError(f"merge_to: unknown key {key!r}")
                    own[key].copy_(value)
        self.pre_calculation()

    def pre_calculation(self) -> None:
        """Merge the LoRA into the base weights and bypass the wrappers (restore_weights undoes it)."""
        if not self.is_static():
            raise ValueError(
                f"this TSM network has {self.num_experts} experts per module (timestep-dependent) and cannot be "
                "merged into static weights; apply it with apply_to, or export/merge its experts with tools/"
            )
        self.merge_text_encoder()
        n = self.config.scales[0]
        for lora in self.denoiser_loras:
            lora.merge_expert(n, int(next(iter(lora.tsm[str(n)]))))
        for lora in self.all_loras:
            lora.remove()
        self._pre_calculated = True

    def restore_weights(self) -> None:
        super().restore_weights()
        if self._pre_calculated:
            for lora in self.all_loras:
                lora.apply_to()
            self._pre_calculated = False


def _datasets_resolution(ss_datasets: str | None) -> tuple[int, int] | None:
    """The largest (width, height) of sd-scripts' ``ss_datasets`` metadata (JSON), if any."""
    try:
        sizes = [tuple(int(v) for v in d["resolution"]) for d in json.loads(ss_datasets or "[]")]
    except (ValueError, TypeError, KeyError):
        return None
    return max(sizes, key=lambda r: r[0] * r[1], default=None)


def check_network_config(
    network_dim: int | None, network_alpha: float | None, neuron_dropout: float | None = None, **kwargs
) -> tuple[TSMConfig, dict[str, Any]]:
    """Everything about ``--network_dim``, ``--network_alpha`` and ``--network_args`` that can be
    checked without a model (keys, values, combinations, the tsm_experts files' metadata).

    sd-scripts imports this module only after loading the models (train_network.py), so
    create_network runs this first; ``python -m networks.tsm_lora`` runs it before a launch.
    Returns the config and the non-config options (tsm_experts, train_t5xxl).
    """
    fields, options = parse_network_args(kwargs)
    if fields.get("dropout") is None:
        fields["dropout"] = neuron_dropout
    experts = options.get("tsm_experts")
    stage = fields.get("stage", "foster")
    if stage == "assemble" and not experts:
        raise ValueError("network_args tsm_stage=assemble needs tsm_experts=<fostered files, one per scale>")
    if stage == "foster" and experts:
        raise ValueError("network_args tsm_experts is only used with tsm_stage=assemble")
    rank = 4 if network_dim is None else int(network_dim)  # None: kohya's default
    if rank < 1:
        raise ValueError(f"--network_dim {network_dim}: the LoRA rank must be >= 1")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"--network_alpha {network_alpha}: must be a finite number")
    for path in experts or ():
        check_tsm_metadata(read_metadata(path), path)
    return TSMConfig(rank=rank, alpha=alpha, **fields), options


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae,
    text_encoder,
    unet,
    neuron_dropout: float | None = None,
    **kwargs,
) -> TSMLoRANetwork:
    """sd-scripts factory. ``kwargs`` are the raw ``--network_args`` (strict: unknown keys are errors)."""
    config, options = check_network_config(network_dim, network_alpha, neuron_dropout, **kwargs)
    train_t5xxl = options.get("train_t5xxl", False)
    network = TSMLoRANetwork(
        config,
        unet,
        _text_encoders(text_encoder, train_t5xxl),
        multiplier=multiplier,
        network_args=kwargs,
        train_t5xxl=train_t5xxl,
    )
    if options.get("tsm_experts"):
        network.load_experts(options["tsm_experts"])
    return network


def create_network_from_weights(
    multiplier: float, file: str | None, vae, text_encoder, unet, weights_sd=None, for_inference: bool = False, **kwargs
):
    """Build the network a TSM file describes. Returns ``(network, weights_sd)``; like kohya,
    the weights are not loaded (callers use load_weights, load_state_dict or merge_to)."""
    if kwargs:
        parse_network_args(kwargs)  # reject typos even where they change nothing
    metadata = None
    if weights_sd is None:
        weights_sd, metadata = load_file(file)
    elif file is not None and os.path.isfile(file):
        metadata = read_metadata(file)
    if metadata is None:
        raise TSMFileError(f"{file}: TSM networks need the file's tsm.* metadata")
    train_t5xxl = any(k.startswith("lora_te3_") and "SelfAttention" in k for k in weights_sd)
    network = TSMLoRANetwork.from_file(
        file,
        unet,
        _text_encoders(text_encoder, train_t5xxl),
        multiplier=multiplier,
        tensors=weights_sd,
        metadata=metadata,
        load=False,
    )
    network.train_t5xxl = train_t5xxl
    return network, weights_sd


def main(argv: Sequence[str] | None = None) -> int:
    """Pre-flight check of a launch's network options in a second, before sd-scripts loads models:
    ``python -m networks.tsm_lora --network_dim 4 --network_alpha 4 --network_args "tsm_scales=8"``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m networks.tsm_lora", description=main.__doc__)
    parser.add_argument("--network_dim", type=int)
    parser.add_argument("--network_alpha", type=float)
    parser.add_argument("--network_dropout", type=float)
    parser.add_argument("--network_args", nargs="*", default=[])
    args = parser.parse_args(argv)
    try:
        malformed = [a for a in args.network_args if "=" not in a]
        if malformed:
            raise ValueError(f"--network_args {malformed[0]!r}: expected key=value")
        kwargs = dict(a.split("=", 1) for a in args.network_args)
        config, _ = check_network_config(args.network_dim, args.network_alpha, args.network_dropout, **kwargs)
    except (ValueError, TSMFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ok: stage {config.stage}, scales {config.scales}, rank {config.rank}, alpha {config.alpha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
