"""A plain LoRA network module with sd-scripts' network interface, written for the tests: what a
third-party ``--network_module`` looks like to train_tsm.py (no TSM code involved).

Keys are kohya's (``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file, save_file
from torch import nn

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "v_proj")


class LoRAModule(nn.Module):
    """``org(x) + up(down(x)) * multiplier * alpha / dim`` on one nn.Linear; x (..., in) -> (..., out)."""

    def __init__(
        self, lora_name: str, org: nn.Linear, multiplier: float, dim: int, alpha: float, dropout: float | None = None
    ):
        super().__init__()
        self.lora_name, self.multiplier, self.dropout = lora_name, multiplier, dropout
        self.lora_down = nn.Linear(org.in_features, dim, bias=False)
        self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.org = [org]  # a list: the base module is not part of this network's state

    def apply_to(self) -> None:
        self.org_forward = self.org[0].forward
        self.org[0].forward = self.forward

    def forward(self, x):
        h = self.lora_down(x)
        if self.dropout and self.training:
            h = nn.functional.dropout(h, self.dropout)
        return self.org_forward(x) + self.lora_up(h) * self.multiplier * self.scale


def _targets(root: nn.Module, prefix: str, suffixes: tuple[str, ...]):
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(suffixes):
            yield f"{prefix}_{name.replace('.', '_')}", module


class LoRANetwork(nn.Module):
    def __init__(self, text_encoders, unet, multiplier: float, dim: int, alpha: float, dropout: float | None):
        super().__init__()
        self.lora_dim = dim
        self.text_encoder_loras = [
            LoRAModule(n, m, multiplier, dim, alpha, dropout)
            for i, te in enumerate(text_encoders)
            for n, m in _targets(te, "lora_te" if len(text_encoders) == 1 else f"lora_te{i + 1}", TEXT_ENCODER_TARGETS)
        ]
        self.unet_loras = [
            LoRAModule(n, m, multiplier, dim, alpha, dropout) for n, m in _targets(unet, "lora_unet", UNET_TARGETS)
        ]

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        groups = []
        for loras, lr in ((self.text_encoder_loras, text_encoder_lr), (self.unet_loras, unet_lr)):
            if loras:
                groups.append({"params": [p for lora in loras for p in lora.parameters()], "lr": lr or default_lr})
        return groups

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self):
        pass

    def save_weights(self, file, dtype, metadata):
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, file, metadata)

    def load_weights(self, file):
        return self.load_state_dict(load_file(file), strict=False)


def _encoders(text_encoder) -> list:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    kwargs.pop("dropout", None)  # what train_network.py adds for LyCORIS
    if kwargs:
        raise ValueError(f"kohya_plain_lora takes no network_args, got {sorted(kwargs)}")
    return LoRANetwork(
        _encoders(text_encoder),
        unet,
        multiplier,
        network_dim or 4,
        network_alpha if network_alpha is not None else 1.0,
        neuron_dropout,
    )


def create_network_from_weights(
    multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kwargs
):
    weights_sd = weights_sd if weights_sd is not None else load_file(file)
    down = next(v for k, v in weights_sd.items() if k.endswith("lora_down.weight"))
    alpha = next(float(v) for k, v in weights_sd.items() if k.endswith(".alpha"))
    return LoRANetwork(_encoders(text_encoder), unet, multiplier, down.shape[0], alpha, None), weights_sd
