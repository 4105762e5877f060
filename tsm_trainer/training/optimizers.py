"""kohya's ``--optimizer_type`` / ``--optimizer_args`` mapped to torch, bitsandbytes, transformers
and prodigyopt classes (names compared case-insensitively, as sd-scripts does)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging

logger = logging.getLogger(__name__)

# lower-case name -> (package to import, attribute path, fixed keyword arguments, pip hint)
_BNB = "bitsandbytes"
OPTIMIZERS: dict[str, tuple[str, str, dict, str]] = {
    "adamw": ("torch.optim", "AdamW", {}, ""),
    "adamw8bit": (_BNB, "optim.AdamW8bit", {}, "bitsandbytes"),
    "pagedadamw": (_BNB, "optim.PagedAdamW", {}, "bitsandbytes"),
    "pagedadamw8bit": (_BNB, "optim.PagedAdamW8bit", {}, "bitsandbytes"),
    "pagedadamw32bit": (_BNB, "optim.PagedAdamW32bit", {}, "bitsandbytes"),
    "lion8bit": (_BNB, "optim.Lion8bit", {}, "bitsandbytes"),
    "pagedlion8bit": (_BNB, "optim.PagedLion8bit", {}, "bitsandbytes"),
    "ademamix8bit": (_BNB, "optim.AdEMAMix8bit", {}, "bitsandbytes"),
    "pagedademamix8bit": (_BNB, "optim.PagedAdEMAMix8bit", {}, "bitsandbytes"),
    "sgdnesterov8bit": (_BNB, "optim.SGD8bit", {"nesterov": True}, "bitsandbytes"),
    "sgdnesterov": ("torch.optim", "SGD", {"nesterov": True}, ""),
    "lion": ("lion_pytorch", "Lion", {}, "lion-pytorch"),
    "adafactor": ("transformers.optimization", "Adafactor", {}, ""),
    "prodigy": ("prodigyopt", "Prodigy", {}, "prodigyopt"),
}


def parse_optimizer_args(items: list[str] | None, flag: str = "--optimizer_args") -> dict:
    """``["weight_decay=0.1", "betas=0.9,0.99"]`` -> ``{"weight_decay": 0.1, "betas": (0.9, 0.99)}``; values
    are Python literals as in kohya (``ast.literal_eval``), a comma makes a tuple, else the string."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = value.split(",")
        parsed = [_literal(v) for v in parts]
        out[key.strip()] = tuple(parsed) if len(parsed) > 1 else parsed[0]
    return out


def _literal(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def resolve(optimizer_type: str):
    """The optimizer class and fixed kwargs for a kohya name or ``module.Class``; ValueError naming
    the flag when unknown or its package is missing."""
    key = optimizer_type.lower()
    if key in OPTIMIZERS:
        package, attr, fixed, pip = OPTIMIZERS[key]
    elif "." in optimizer_type:
        package, attr = optimizer_type.rsplit(".", 1)
        fixed, pip = {}, ""
    else:
        raise ValueError(
            f"--optimizer_type {optimizer_type}: unknown; one of {', '.join(_display_names())}, or a module.Class path"
        )
    if importlib.util.find_spec(package.split(".")[0]) is None:
        raise ValueError(f"--optimizer_type {optimizer_type} needs {pip or package}: pip install {pip or package}")
    obj = importlib.import_module(package)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--optimizer_type {optimizer_type}: {package} has no {attr}")
        obj = getattr(obj, part)
    return obj, fixed


def _display_names() -> list[str]:
    from tsm_trainer.training.config import OPTIMIZERS as NAMES

    return list(NAMES)


def build_optimizer(optimizer_type: str, groups, learning_rate: float, optimizer_args: dict, weight_decay: float):
    """The optimizer over ``groups`` (param groups with their own "lr" where the network set one)."""
    cls, kwargs = resolve(optimizer_type)
    kwargs = dict(kwargs)
    key = optimizer_type.lower()
    if key == "adafactor":
        # kohya defaults to Adafactor's own relative-step schedule; here the given --learning_rate is used
        kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
    if key == "prodigy" and learning_rate <= 0.1:
        # Passed through as sd-scripts does (Prodigy's lr multiplies its adapted step size), with its warning.
        logger.warning(
            "--learning_rate %g is low for Prodigy, which adapts the step size itself and expects a "
            "learning rate around 1.0; it is used as given",
            learning_rate,
        )
    if key == "sgdnesterov":
        kwargs["momentum"] = 0.9  # kohya's default
    if key in ("adamw", "adamw8bit", "pagedadamw", "pagedadamw8bit", "pagedadamw32bit", "adafactor", "prodigy"):
        kwargs["weight_decay"] = weight_decay
    kwargs.update(optimizer_args)
    if key == "adamw" and "fused" not in kwargs and "foreach" not in kwargs:
        # Fused: one kernel for the many small expert tensors (6x faster steps than the per-tensor loop
        # on CPU); devices without a fused kernel get the multi-tensor version.
        try:
            return cls(groups, lr=learning_rate, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            return cls(groups, lr=learning_rate, foreach=True, **kwargs)
    try:
        return cls(groups, lr=learning_rate, **kwargs)
    except TypeError as e:
        raise ValueError(f"--optimizer_type {optimizer_type} with --optimizer_args {optimizer_args}: {e}") from None
