"""``--network_module``: build and drive any network module with kohya's interface, in the order
sd-scripts' train_network.py calls it (create_network or create_network_from_weights,
prepare_network, apply_to, load_weights, enable_gradient_checkpointing,
prepare_optimizer_params[_with_multiple_te_lrs], prepare_grad_etc; per epoch on_epoch_start; per
step apply_max_norm_regularization; save_weights)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from tsm_trainer.training.config import TrainConfig

TSM_MODULE = "networks.tsm_lora"
# trainer options that are network_args of networks.tsm_lora
TSM_OPTIONS = ("tsm_scales", "tsm_stage", "tsm_experts", "tsm_mixture", "tsm_interval")


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """kohya: each ``--network_args`` item is ``key=value`` (split at the first '=')."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--network_args {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if key in out:
            raise ValueError(f"--network_args {key} is given twice")
        out[key] = value
    return out


def import_network_module(name: str):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"--network_module {name}: cannot import it ({e})") from None
    missing = [f for f in ("create_network", "create_network_from_weights") if not hasattr(module, f)]
    if missing:
        raise ValueError(f"--network_module {name}: not a kohya network module (no {', '.join(missing)})")
    return module


def tsm_network_args(config: TrainConfig) -> dict[str, str]:
    """The network_args networks.tsm_lora receives: the --network_args given plus the trainer's
    --tsm_* options (the two agree: validate.resolve_tsm_options checked that)."""
    args = parse_network_args(config.network_args)
    args["tsm_scales"] = ",".join(str(n) for n in config.scales)
    if config.tsm_stage == "assemble":
        args["tsm_stage"] = "assemble"
        args["tsm_experts"] = config.tsm_experts
        args["tsm_mixture"] = config.tsm_mixture
    else:
        for key in ("tsm_stage", "tsm_experts", "tsm_mixture"):
            args.pop(key, None)
    if config.tsm_interval >= 0:
        args["tsm_interval"] = str(config.tsm_interval)
    else:
        args.pop("tsm_interval", None)
    return args


@dataclass
class BuiltNetwork:
    network: nn.Module
    param_groups: list[dict]
    network_args: dict[str, str]
    train_unet: bool
    train_text_encoder: bool


def build_network(config: TrainConfig, components, log=print) -> BuiltNetwork:
    """Create, apply and prepare the network for training as train_network.py does."""
    module = import_network_module(config.network_module)
    is_tsm = config.network_module == TSM_MODULE
    net_kwargs = tsm_network_args(config) if is_tsm else parse_network_args(config.network_args)
    encoders = components.text_encoders
    if is_tsm and config.network_train_unet_only:
        # apply_to drops a text-encoder LoRA anyway; without one, assembling unet-only fostered files works
        encoders = []
    text_encoder = encoders if len(encoders) > 1 else (encoders[0] if encoders else None)
    unet, vae = components.denoiser, components.vae
    if config.dim_from_weights:
        network, _ = module.create_network_from_weights(
            1, config.network_weights, vae, text_encoder, unet, **net_kwargs
        )
    else:
        if "dropout" not in net_kwargs:
            net_kwargs["dropout"] = config.network_dropout  # kohya's workaround for LyCORIS
        network = module.create_network(
            1.0,
            config.network_dim,
            config.network_alpha,
            vae,
            text_encoder,
            unet,
            neuron_dropout=config.network_dropout,
            **net_kwargs,
        )
    if network is None:
        raise ValueError(f"--network_module {config.network_module}: create_network returned no network")
    if hasattr(network, "prepare_network"):
        network.prepare_network(config)
    if config.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
        raise ValueError(f"--scale_weight_norms: {config.network_module} has no apply_max_norm_regularization")
    train_unet = not config.network_train_text_encoder_only
    train_text_encoder = not config.network_train_unet_only
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    if config.network_weights:
        info = network.load_weights(config.network_weights)
        log(f"loaded network weights from {config.network_weights}: {info}")
    if config.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    te_lr = config.text_encoder_lr
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        results = network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, config.unet_lr, config.learning_rate)
    else:
        single = None if not te_lr else te_lr[0]
        results = network.prepare_optimizer_params(single, config.unet_lr, config.learning_rate)
    groups = results[0] if isinstance(results, tuple) else results
    groups = [g if isinstance(g, dict) else {"params": list(g)} for g in groups]
    if not any(list(g["params"]) for g in groups):
        raise ValueError(
            f"--network_module {config.network_module}: the network has no trainable parameters "
            "(check --network_train_unet_only / --network_train_text_encoder_only and the lrs)"
        )
    network.prepare_grad_etc(text_encoder, unet)
    return BuiltNetwork(network, groups, net_kwargs, train_unet, train_text_encoder)
