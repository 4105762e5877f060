"""Refuse broken weights before anything uses them (issue 15): non-finite values, non-float
dtypes, down/up factors whose ranks disagree, and native files whose keys contradict their
``tsm.*`` metadata. Every error names the key and the file.

The metadata check runs before a network is built from a file: a forged ``tsm.scales =
[1000000]`` must not make a loader allocate a million experts per module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata
from tsm_trainer.core.lora_math import experts_in

# the two factors of one LoRA pair: kohya (lora_down/lora_up, also per TSM expert) and PEFT (lora_A/lora_B)
_PAIR_SUFFIXES = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"))


def check_lora_tensors(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Every tensor a finite float, every down factor with its up factor of the same rank,
    every alpha one finite number.

    Raises:
        TSMFileError: naming the first offending key and ``path``.
    """
    if not tensors:
        raise TSMFileError(f"{path}: holds no tensors (an empty or unfinished file)")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise TSMFileError(
                f"{path}: key {key!r} has dtype {str(t.dtype).replace('torch.', '')}; LoRA weights "
                "must be floating point (quantized files are not supported)"
            )
        if not bool(torch.isfinite(t).all()):
            raise TSMFileError(
                f"{path}: key {key!r} holds NaN or Inf values (a diverged training? use an earlier checkpoint)"
            )
        if key.endswith(".alpha") and t.numel() != 1:
            raise TSMFileError(f"{path}: key {key!r} has shape {tuple(t.shape)}; an alpha is one number")
        for down_suffix, up_suffix in _PAIR_SUFFIXES:
            if key.endswith(down_suffix):
                up_key = key[: -len(down_suffix)] + up_suffix
                up = tensors.get(up_key)
                if up is None:
                    raise TSMFileError(f"{path}: key {key!r} has no matching {up_key!r}")
                if t.dim() < 2 or up.dim() < 2 or up.shape[1] != t.shape[0]:
                    raise TSMFileError(
                        f"{path}: key {up_key!r} has shape {tuple(up.shape)}, which does not match "
                        f"the rank of {key!r} {tuple(t.shape)}"
                    )
            elif key.endswith(up_suffix) and key[: -len(up_suffix)] + down_suffix not in tensors:
                raise TSMFileError(f"{path}: key {key!r} has no matching {key[: -len(up_suffix)] + down_suffix!r}")


def experts_by_scale(tensors: Mapping[str, torch.Tensor]) -> dict[int, set[int]]:
    """{scale: {experts}} whose keys a native file holds."""
    return {n: set(es) for n, es in experts_in(tensors).items()}


def check_keys_match_metadata(tensors: Mapping[str, torch.Tensor], info: Mapping, path: str) -> None:
    """The expert keys are exactly those ``tsm.scales`` / ``tsm.interval`` promise, and an
    assembled file's router tables have ``tsm.num_train_timesteps`` rows.

    Raises:
        TSMFileError: naming the scale or key that disagrees, and ``path``.
    """
    scales, interval, T = info["scales"], info["interval"], info["num_train_timesteps"]
    present = experts_by_scale(tensors)
    if not present:
        raise TSMFileError(f"{path}: holds no expert keys ('<module>.tsm.<n>.<e>.lora_down.weight')")
    for n in sorted(set(present) - set(scales)):
        raise TSMFileError(f"{path}: keys '.tsm.{n}.*' belong to scale {n}, which is not in tsm.scales={scales}")
    for i, n in enumerate(scales):
        found = present.get(n, set())
        if i == 0 and interval is not None:
            if found != {interval}:
                raise TSMFileError(f"{path}: tsm.interval={interval} but scale {n} holds experts {sorted(found)}")
        elif len(found) != n or max(found, default=-1) != n - 1:
            missing = n - len(found) if len(found) < n else 0
            raise TSMFileError(
                f"{path}: tsm.scales says scale {n} has {n} experts, the keys hold {len(found)}"
                + (f" ({missing} missing)" if missing else f" (e.g. expert {max(found)})")
                + ": the metadata does not describe these tensors"
            )
    for key, t in tensors.items():
        if key.endswith(".router.embedding") and t.shape[0] != T:
            raise TSMFileError(f"{path}: key {key!r} has {t.shape[0]} rows, tsm.num_train_timesteps={T}")


def check_tsm_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str) -> dict:
    """:func:`check_tsm_metadata` plus both checks above; returns the parsed metadata."""
    info = check_tsm_metadata(metadata, path)
    check_lora_tensors(tensors, path)
    check_keys_match_metadata(tensors, info, path)
    return info
