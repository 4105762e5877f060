"""kohya LoRA keys and delta math (docs/design.md section 5): pure functions on ``{key: tensor}``.

Keys: a plain pair is ``{lora_name}.lora_down.weight`` / ``{lora_name}.lora_up.weight`` with an
optional ``{lora_name}.alpha``; a TSM expert pair is ``{lora_name}.tsm.{n}.{e}.lora_down.weight``
(the module's one alpha is shared by its experts). ``lora_name`` holds no dot.

Delta: ``(alpha / r) B A`` in the base weight's layout, alpha missing meaning alpha = r.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

PLAIN_KEY = re.compile(r"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
EXPERT_KEY = re.compile(r"^(?P<module>[^.]+)\.tsm\.(?P<n>\d+)\.(?P<e>\d+)\.(?P<part>lora_down|lora_up)\.weight$")


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x.tsm.8.3.lora_down.weight"`` -> ``("lora_unet_x", "tsm.8.3.lora_down.weight")``."""
    name, _, part = key.partition(".")
    return name, part


def module_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The sorted kohya module names (``lora_name``) of a file's keys."""
    return sorted({split_key(k)[0] for k in tensors})


def experts_in(tensors: Mapping[str, torch.Tensor]) -> dict[int, list[int]]:
    """{scale: [experts]} present in a native file's tensors."""
    found: dict[int, set[int]] = {}
    for key in tensors:
        m = EXPERT_KEY.match(key)
        if m:
            found.setdefault(int(m["n"]), set()).add(int(m["e"]))
    return {n: sorted(es) for n, es in sorted(found.items())}


def pair_delta(down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * B A`` in the base weight's layout, in the factors' dtype.

    Shapes (r = rank): Linear down A (r, in), up B (out, r) -> (out, in); 1x1 Conv down
    (r, in, 1, 1), up (out, r, 1, 1) -> (out, in, 1, 1); kxk Conv down (r, in, kh, kw), up
    (out, r, 1, 1) -> (out, in, kh, kw).
    """
    if down.dim() == 2:
        delta = up @ down
    elif down.shape[2:] == (1, 1):
        delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(-1).unsqueeze(-1)
    else:
        delta = torch.einsum("dr,rkhw->dkhw", up.flatten(1), down)
    return delta if scale == 1.0 else delta * scale


def lora_delta(tensors: Mapping[str, torch.Tensor], name: str, pair: str | None = None) -> torch.Tensor:
    """``(alpha/r) B A`` of module ``name`` in float32 (alpha missing: alpha = r).

    Args:
        tensors: kohya keys.
        name: the module's ``lora_name`` (its alpha is ``{name}.alpha``).
        pair: the key prefix of the factors, ``name`` (default) or ``f"{name}.tsm.{n}.{e}"``.
    """
    pair = name if pair is None else pair
    down, up = tensors[f"{pair}.lora_down.weight"].float(), tensors[f"{pair}.lora_up.weight"].float()
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
    return pair_delta(down, up, alpha / down.shape[0])


def first_factor(tensors: Mapping[str, torch.Tensor], name: str, part: str) -> torch.Tensor:
    """The first ``lora_down`` or ``lora_up`` (``part``) factor of module ``name``, plain or of any
    expert: (r, in[, kh, kw]) or (out, r[, 1, 1]); experts of a module share their shapes."""
    return next(v for k, v in tensors.items() if k.startswith(name + ".") and k.endswith(f"{part}.weight"))


def module_ranks(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{lora_name: rank}`` of every module with a ``lora_down`` factor (plain or expert), in key
    order; the rank is its first down factor's row count (experts of a module share it)."""
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        if key.endswith(".lora_down.weight"):
            ranks.setdefault(split_key(key)[0], int(value.shape[0]))
    return ranks
