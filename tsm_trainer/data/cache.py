"""Latent and text-encoder output caches, in memory or on disk as .safetensors (atomic writes).

No model is imported here: the caller passes the encode functions.

- LatentCache: key = hash(namespace, file path, mtime+size, bucket, resize, crop, flip), so an
  edited image, another bucket setting or another VAE (`namespace`) never reuses a stale entry.
  Value: one sample's latents, e.g. (C, h, w) for an image or (F, C, h, w) / (C, F, h, w) for a clip.
- TextEncoderCache: key = hash(namespace, caption string). Value: a dict of tensors of one caption
  (e.g. {"hidden": (L, D), "pooled": (D,)}); `encode` returns them stacked with a batch dim.
  Valid only while the text encoder is frozen; with static captions (DataConfig.captions_static)
  `prepare` can encode every caption before training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tsm_trainer.core.atomic_write import atomic_file


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()[:40]


class _TensorStore:
    """key -> dict[str, Tensor], in a dict (cache_dir None) or as `<cache_dir>/<key>.safetensors`.
    In memory, tensors move to the CPU unless ``keep_device``."""

    def __init__(self, cache_dir: str | Path | None, keep_device: bool = False):
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.keep_device = keep_device
        self.mem: dict[str, dict[str, torch.Tensor]] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self.mem if self.dir is None else self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.dir is None:
            return self.mem.get(key)
        p = self.path(key)
        return load_file(p) if p.is_file() else None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``tensors`` under ``key``; returns them as stored (detached; on the CPU but in memory
        with ``keep_device``)."""
        if self.dir is None and self.keep_device:
            self.mem[key] = {k: v.detach() for k, v in tensors.items()}
            return self.mem[key]
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.dir is None:
            self.mem[key] = tensors
            return tensors
        with atomic_file(self.path(key), suffix=".tmp", fsync=False) as tmp:  # readers never see a half-written file
            save_file(tensors, tmp, metadata={"key": key})
        return tensors


class LatentCache:
    """encode_fn: pixels (B, 3, H, W) or (B, F, 3, H, W) in [-1, 1] -> latents (B, ...); may be None
    once every needed entry is cached (the VAE can then be freed)."""

    def __init__(
        self,
        encode_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        cache_dir: str | Path | None = None,
        namespace: str = "",
        dtype: torch.dtype | None = None,
    ):
        self.encode_fn = encode_fn
        self.namespace = namespace
        self.dtype = dtype
        self.store = _TensorStore(cache_dir)
        self.hits = 0
        self.misses = 0

    def key(
        self,
        path: str,
        stamp: str,
        bucket: tuple[int, int],
        resized: tuple[int, int],
        offset: tuple[int, int],
        flip: bool,
    ) -> str:
        return _digest("latent", self.namespace, os.path.abspath(path), stamp, bucket, resized, offset, flip)

    def __contains__(self, key: str) -> bool:
        return key in self.store

    def get(self, key: str) -> torch.Tensor | None:
        got = self.store.get(key)
        return None if got is None else got["latents"]

    def latents(self, keys: list[str], load_pixels: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """(B, ...) latents of `keys`; misses are encoded from load_pixels(miss_indices) and stored."""
        found = [self.get(k) for k in keys]
        miss = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if miss:
            if self.encode_fn is None:
                raise RuntimeError(
                    f"latent cache miss for {len(miss)} sample(s) and no encode function "
                    "(cache all latents before freeing the VAE)"
                )
            with torch.no_grad():
                enc = self.encode_fn(load_pixels(miss))
            if self.dtype is not None:
                enc = enc.to(self.dtype)
            for j, i in enumerate(miss):
                found[i] = enc[j].detach().cpu()
                self.store.put(keys[i], {"latents": found[i]})
        return torch.stack(found)


class TextEncoderCache:
    """Outputs of a frozen text encoder, one entry per caption string (the trainer, distillation and
    evaluation all encode through it, so each distinct caption is encoded once).

    encode_fn: list[str] (B captions) -> dict[str, Tensor] each (B, ...), e.g. ``family.encode_text``.
    In memory (``cache_dir`` None) entries stay on the device encode_fn returned them on; on disk
    they are read back on the CPU.
    """

    def __init__(
        self,
        encode_fn: Callable[[list[str]], dict[str, torch.Tensor]] | None,
        cache_dir: str | Path | None = None,
        namespace: str = "",
    ):
        self.encode_fn = encode_fn
        self.namespace = namespace
        self.store = _TensorStore(cache_dir, keep_device=True)

    def key(self, caption: str) -> str:
        return _digest("text", self.namespace, caption)

    def __contains__(self, caption: str) -> bool:
        return self.key(caption) in self.store

    def clear(self) -> None:
        """Forget every entry held in memory (the text encoder changed, e.g. another LoRA file)."""
        if self.store.dir is not None:
            raise ValueError(
                f"{self.store.dir}: a text-encoder cache on disk is not cleared; use another "
                "namespace or delete the folder"
            )
        self.store.mem.clear()

    def prepare(self, captions: list[str], batch_size: int = 16) -> int:
        """Encode every caption not cached yet, in batches. Returns the number encoded."""
        todo = sorted({c for c in captions if c not in self})
        for k in range(0, len(todo), batch_size):
            self._encode_and_store(todo[k : k + batch_size])
        return len(todo)

    def _encode_and_store(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        if self.encode_fn is None:
            raise RuntimeError(f"text-encoder cache miss for {captions[0]!r} and no encode function")
        with torch.no_grad():
            out = self.encode_fn(captions)
        return [self.store.put(self.key(c), {n: t[i] for n, t in out.items()}) for i, c in enumerate(captions)]

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Stacked outputs (B, ...) for ``captions``: the missing ones are encoded together (each once,
        in sorted order) and stored."""
        rows = [self.store.get(self.key(c)) for c in captions]
        missing = sorted({c for c, r in zip(captions, rows) if r is None})
        if missing:
            encoded = dict(zip(missing, self._encode_and_store(missing)))
            rows = [encoded[c] if r is None else r for c, r in zip(captions, rows)]
        return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}
