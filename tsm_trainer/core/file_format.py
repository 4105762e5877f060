"""The native ``.safetensors`` file (docs/design.md section 4): atomic writes, sd-scripts hashes,
strict validation. Only safetensors is ever read; nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize

from tsm_trainer.core.atomic_write import atomic_file

FORMAT_VERSION = "1"


class TSMFileError(ValueError):
    """A file that cannot be read, or does not fit the model it is loaded into."""


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as sd-scripts computes them.

    The model hash is the sha256 of the tensor-data section of the file serialised with only
    the ``ss_*`` metadata (so later user metadata doesn't change it); the legacy hash is the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of that serialisation.
    """
    data = serialize(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def tensor_data_sha256(path: str) -> str:
    """sha256 of the tensor-data section of a safetensors file on disk (its ``sshs_model_hash``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None, add_hashes: bool = True
) -> dict[str, str]:
    """Write tensors to ``path`` via a temp file in the same folder and an atomic rename.

    Returns the metadata written (with ``sshs_*`` hashes when ``add_hashes``).
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    if add_hashes:
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sshs_hashes(tensors, metadata)
    data = serialize(tensors, metadata)
    with atomic_file(path, suffix=".safetensors") as tmp, open(tmp, "wb") as f:
        f.write(data)
    return metadata


def check_not_an_input(out: str, inputs: Sequence[str], flag: str = "--out") -> None:
    """Refuse an output path that is (or resolves to, through links) one of the inputs."""
    for path in inputs:
        same = os.path.realpath(out) == os.path.realpath(path)
        if not same and os.path.exists(out) and os.path.exists(path):
            same = os.path.samefile(out, path)
        if same:
            raise TSMFileError(
                f"{flag} {out} is the input file {path}: choose another output path (the input would be overwritten)"
            )


def read_metadata(path: str) -> dict[str, str]:
    _check_readable(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise TSMFileError(f"{path}: not a readable safetensors file ({e})") from None


def load_file(path: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a clear :class:`TSMFileError` otherwise."""
    _check_readable(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise TSMFileError(f"{path}: not a readable safetensors file, maybe truncated or corrupt ({e})") from None
    return tensors, metadata


def _check_readable(path: str) -> None:
    if not os.path.isfile(path):
        raise TSMFileError(f"{path}: no such file")
    try:
        open(path, "rb").close()  # safetensors reports a refused open as "No such file or directory"
    except PermissionError:
        raise TSMFileError(f"{path}: permission denied (make the file readable by this user)") from None
    if not str(path).endswith(".safetensors"):
        raise TSMFileError(f"{path}: only .safetensors files are loaded (never pickle-based .pt/.ckpt/.bin)")


def check_tsm_metadata(metadata: Mapping[str, str], path: str) -> dict:
    """Parse and check the ``tsm.*`` metadata; returns scales, stage, mixture, T, space, interval."""
    version = metadata.get("tsm.format_version")
    if version is None:
        raise TSMFileError(f"{path}: no 'tsm.format_version' metadata: not a TSM file (a plain LoRA?)")
    if version != FORMAT_VERSION:
        raise TSMFileError(
            f"{path}: tsm.format_version {version!r} is not supported (this version reads {FORMAT_VERSION!r})"
        )
    try:
        scales = [int(n) for n in json.loads(metadata["tsm.scales"])]
        info: dict[str, Any] = {
            "scales": scales,
            "stage": metadata["tsm.stage"],
            "mixture": metadata.get("tsm.mixture", "asymmetric"),
            "num_train_timesteps": int(metadata["tsm.num_train_timesteps"]),
            "timestep_space": metadata["tsm.timestep_space"],
            "interval": int(metadata["tsm.interval"]) if metadata.get("tsm.interval") not in (None, "") else None,
        }
    except KeyError as e:
        raise TSMFileError(f"{path}: metadata key {e.args[0]!r} is missing") from None
    except (ValueError, TypeError) as e:
        raise TSMFileError(f"{path}: malformed tsm.* metadata ({e})") from None
    T = info["num_train_timesteps"]
    if T < 1:
        raise TSMFileError(f"{path}: tsm.num_train_timesteps={T} must be >= 1")
    if not scales or any(not 1 <= n <= T for n in scales):
        raise TSMFileError(f"{path}: tsm.scales={scales}: every scale must be in 1..tsm.num_train_timesteps={T}")
    if info["interval"] is not None and not 0 <= info["interval"] < scales[0]:
        raise TSMFileError(f"{path}: tsm.interval={info['interval']} is not an expert of scale {scales[0]}")
    if info["stage"] not in ("foster", "assemble"):
        raise TSMFileError(f"{path}: tsm.stage {info['stage']!r} is not 'foster' or 'assemble'")
    if info["mixture"] not in ("asymmetric", "symmetric"):
        raise TSMFileError(f"{path}: tsm.mixture {info['mixture']!r} is not 'asymmetric' or 'symmetric'")
    return info


def check_state_dict(expected: Mapping[str, torch.Size], tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Every expected key present with its shape, no unknown key; the error names key and file."""
    missing = [k for k in expected if k not in tensors]
    unknown = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unknown:
        problems.append(
            f"{len(unknown)} unknown key(s) (a file for another base model or targets?), e.g. {unknown[:3]}"
        )
    for k, shape in expected.items():
        if k in tensors and tuple(tensors[k].shape) != tuple(shape):
            problems.append(f"key {k!r} has shape {tuple(tensors[k].shape)}, the model needs {tuple(shape)}")
            break
    if problems:
        raise TSMFileError(f"{path}: does not fit this model: " + "; ".join(problems))
