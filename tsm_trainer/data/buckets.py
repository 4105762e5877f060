"""Aspect-ratio buckets, kohya sd-scripts semantics.

Sizes here are (width, height), kohya's order; the dataset turns them into (H, W) for tensors.

- enable_bucket, upscaling allowed: a fixed list from :func:`make_bucket_resolutions`; an image
  goes to the bucket with the closest aspect ratio (its exact size wins if it is in the list),
  is scaled so that it covers the bucket, then cropped.
- bucket_no_upscale: the bucket is derived from the image itself: scaled down (aspect kept) only
  if its area exceeds resolution^2, then floored to multiples of bucket_reso_steps and cropped.
- enable_bucket = false: one bucket, the resolution; scale to cover, crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """Bucket sizes (w, h) whose area is at most max_reso's area, sides in [min_size, max_size],
    multiples of `divisible`, sorted. Always contains the largest square that fits the area."""
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // divisible) * divisible
    sizes = {(side, side)}
    for w in range(min_size, max_size + 1, divisible):
        h = min(max_size, (area // w) // divisible * divisible)
        if h >= min_size:
            sizes.add((w, h))
            sizes.add((h, w))
    return sorted(sizes)


@dataclass(frozen=True)
class BucketChoice:
    """bucket: final (w, h) of the sample; resized: (w, h) the image is scaled to before cropping
    (each side >= the bucket's side)."""

    bucket: Size
    resized: Size


class BucketSelector:
    """Chooses the bucket of an image size for one dataset's settings."""

    def __init__(
        self,
        resolution: Size,
        enable_bucket: bool = False,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
    ):
        self.max_area = resolution[0] * resolution[1]
        self.steps = bucket_reso_steps
        self.no_upscale = enable_bucket and bucket_no_upscale
        if not enable_bucket:
            self.predefined = [tuple(resolution)]
        elif not bucket_no_upscale:
            self.predefined = make_bucket_resolutions(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
        else:
            self.predefined = []

    def select(self, width: int, height: int) -> BucketChoice:
        """Bucket and resize target for an image of (width, height) pixels."""
        if self.no_upscale:
            return self._select_no_upscale(width, height)
        ar = width / height
        if (width, height) in self.predefined:
            bucket = (width, height)
        else:
            bucket = min(self.predefined, key=lambda s: abs(s[0] / s[1] - ar))  # first of ties, like argmin
        # scale so the image covers the bucket: match the side that is relatively shorter
        scale = bucket[1] / height if ar > bucket[0] / bucket[1] else bucket[0] / width
        resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
        return BucketChoice(bucket, resized)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def _select_no_upscale(self, width: int, height: int) -> BucketChoice:
        ar = width / height
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * ar)
            rh = self.max_area / rw
            # round either the width or the height to steps; keep whichever distorts the aspect less
            bw = self._round(rw)
            ar_w = bw / max(self._round(bw / ar), 1)
            bh = self._round(rh)
            ar_h = self._round(bh * ar) / max(bh, 1)
            if abs(ar_w - ar) < abs(ar_h - ar):
                resized = (bw, int(bw / ar + 0.5))
            else:
                resized = (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if bucket[0] == 0 or bucket[1] == 0:
            raise ValueError(f"image of {width}x{height} is smaller than bucket_reso_steps={self.steps} on one side")
        return BucketChoice(bucket, resized)
