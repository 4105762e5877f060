"""Reading a single-file checkpoint: key names and shapes first (cheap), tensors on demand.

``.safetensors`` is read through its header (no tensor is loaded until asked for); ``.ckpt`` /
``.pt`` / ``.pth`` only through torch's ``weights_only`` loader, which refuses pickled code.
"""

from __future__ import annotations

import os

import torch

from tsm_trainer.base_models.loading import BaseModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")


def is_single_file(path: str) -> bool:
    """True for a file whose suffix is one of the single-file checkpoint formats."""
    return os.path.isfile(path) and path.lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)


class CheckpointFile:
    """One checkpoint file. ``shapes``: {key: shape}; ``metadata``: the safetensors header's
    string metadata ({} for .ckpt); ``tensors(prefix)``: the tensors under a key prefix."""

    def __init__(self, path: str):
        self.path = path
        lower = path.lower()
        self._state: dict[str, torch.Tensor] | None = None
        if lower.endswith(SAFETENSORS_SUFFIXES):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    self.metadata = dict(f.metadata() or {})
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:
                raise BaseModelError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from None
        elif lower.endswith(TORCH_SUFFIXES):
            self.metadata = {}
            self._state = _torch_state_dict(path)
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        else:
            raise BaseModelError(f"{path}: not a checkpoint file (expected .safetensors, or .ckpt/.pt/.pth)")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """{key: tensor} of every key starting with ``prefix`` (full key names, dtype as stored)."""
        keys = [k for k in self.shapes if k.startswith(prefix)]
        if self._state is not None:
            return {k: self._state[k] for k in keys}
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}


def _torch_state_dict(path: str) -> dict[str, torch.Tensor]:
    import zipfile

    try:
        # mmap needs the zip format (torch >= 1.6 saves); older files are read whole
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(
            f"{path}: refused by torch's weights_only loader ({first}); only plain tensors are "
            "loaded, never pickled code: convert the file to .safetensors"
        ) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise BaseModelError(f"{path}: holds no state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BaseModelError(f"{path}: holds no tensors")
    return tensors
