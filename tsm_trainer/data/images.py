"""Image files: finding, verifying, loading and fitting them to a bucket.

Tensors: one image -> (3, H, W) float32 in [-1, 1]; a clip -> (F, 3, H, W). The same crop
and flip apply to every frame of a clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsm_trainer.data.buckets import BucketChoice

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (extension case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_clips(folder: Path) -> list[Path]:
    """Sub-folders of `folder` (each a clip of frame images), sorted by name; hidden ones skipped."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def verify_image(path: Path) -> tuple[int, int]:
    """(width, height) of a fully decodable image; raises OSError/ValueError (any PIL failure, or
    :class:`ImageModeError`) if not."""
    with Image.open(path) as im:
        im.verify()  # structure and checksums
    with Image.open(path) as im:
        im.load()  # full decode: catches truncated data that verify() lets through
        if im.mode == "F":
            to_rgb(im, path)  # raises ImageModeError now rather than mid-training
        return im.size


class ImageModeError(ValueError):
    """An image whose pixel format cannot be turned into 8-bit RGB faithfully."""


def to_rgb(im: Image.Image, path: Path | str) -> Image.Image:
    """``im`` as 8-bit RGB. 16/32-bit grey (modes I;16*, I) is scaled from 0..65535 (PIL's own
    convert clips it at 255: a white image); palette, grey, CMYK and the alpha modes use PIL's
    convert, which drops alpha like kohya's loader; float images (mode F) are refused by name."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):
        grey = np.asarray(im).astype(np.float64)
        return Image.fromarray((np.clip(grey, 0, 65535) / 257.0 + 0.5).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise ImageModeError(
            f"{path}: 32-bit float pixels (mode F) are not supported; save it as an 8- or 16-bit image"
        )
    return im.convert("RGB")


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB (see :func:`to_rgb`). With ``size`` (w, h), the size it will be resized
    to, a JPEG far larger is decoded at 1/2, 1/4 or 1/8 scale (still at least twice ``size``)."""
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (2 * size[0], 2 * size[1]))
        return np.asarray(to_rgb(im, path))


def crop_offset(choice: BucketChoice, random_crop: bool, rng: np.random.Generator | None) -> tuple[int, int]:
    """(left, top) of the bucket inside the resized image: centred, or uniform if random_crop."""
    dx = choice.resized[0] - choice.bucket[0]
    dy = choice.resized[1] - choice.bucket[1]
    if random_crop:
        assert rng is not None, "random_crop needs an rng"
        return int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    return dx // 2, dy // 2


def fit_to_bucket(image: np.ndarray, choice: BucketChoice, offset: tuple[int, int], flip: bool) -> np.ndarray:
    """(H0, W0, 3) uint8 -> (bh, bw, 3) uint8: resize to choice.resized (Lanczos), crop at offset, flip."""
    if (image.shape[1], image.shape[0]) != choice.resized:
        # reducing_gap: a box reduction first when shrinking 6x or more (Lanczos over the whole image is slow)
        image = np.asarray(Image.fromarray(image).resize(choice.resized, Image.LANCZOS, reducing_gap=3.0))
    left, top = offset
    bw, bh = choice.bucket
    image = image[top : top + bh, left : left + bw]
    if flip:
        image = image[:, ::-1]
    return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    # np.array copies: arrays from PIL are read-only
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_sample(
    frames: tuple[str, ...], video: bool, choice: BucketChoice, offset: tuple[int, int], flip: bool
) -> torch.Tensor:
    """Pixels of one sample: (3, H, W) for an image, (F, 3, H, W) for a clip (video=True)."""
    out = [to_tensor(fit_to_bucket(load_rgb(Path(f), choice.resized), choice, offset, flip)) for f in frames]
    return torch.stack(out) if video else out[0]
