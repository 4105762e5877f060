"""Scanning a DataConfig once, before training: every image is opened and decoded here, so a bad
file is reported (with its path) or fails the run now, never mid-epoch.

Captions: `<image stem><caption_extension>` next to the image; for a clip folder `clip/`, the
file `clip<caption_extension>` next to the folder. A missing caption uses `class_tokens`
(DreamBooth style); without class_tokens it is a problem like an unreadable image.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tsm_trainer.data.buckets import BucketChoice, BucketSelector
from tsm_trainer.data.captions import (
    ESTIMATED_CLIP,
    CaptionFileError,
    CaptionLength,
    caption_too_long,
    read_caption_file,
)
from tsm_trainer.data.config import DataConfig, DatasetConfig, SubsetConfig
from tsm_trainer.data.errors import DatasetConfigError, DatasetError
from tsm_trainer.data.images import IMAGE_EXTENSIONS, list_clips, list_images, verify_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One sample source. path: the image file or clip folder; frames: its image files (1 for an image);
    caption: raw caption text (or class_tokens); size: (w, h) pixels; stamp: mtime/size fingerprint."""

    path: str
    frames: tuple[str, ...]
    caption: str
    size: tuple[int, int]
    choice: BucketChoice
    stamp: str
    dataset: int
    subset: int


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class ScanResult:
    """items[d]: the usable items of dataset d, in a stable (sorted) order; problems: what was skipped;
    warnings: what is used but partly lost (over-long captions), one per file."""

    config: DataConfig
    items: list[list[Item]]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ImageLimits:
    """Images beyond these are problems (reported and skipped, or refused with on_error="raise"):
    ``max_upscale``: how much a side may be enlarged to fill its bucket (a 1x1 image would be
    blown up hundreds of times); ``max_aspect_ratio``: long side / short side (a 10000x10 strip is
    mostly cropped away after resizing it to gigabytes)."""

    max_upscale: float = 4.0
    max_aspect_ratio: float = 8.0


def _stamp(files: tuple[str, ...]) -> str:
    stats = [Path(f).stat() for f in files]
    return f"{max(s.st_mtime_ns for s in stats)}-{sum(s.st_size for s in stats)}"


def _check_item(
    path: Path, frames: tuple[str, ...], caption: str, selector: BucketSelector, di: int, si: int, limits: ImageLimits
) -> Item | Problem:
    sizes = set()
    for f in frames:
        try:
            sizes.add(verify_image(Path(f)))
        except Exception as e:  # PIL raises many types for bad data
            return Problem(f, f"unreadable image ({type(e).__name__}: {e})")
    if len(sizes) != 1:
        return Problem(str(path), f"frames of one clip differ in size: {sorted(sizes)}")
    size = sizes.pop()
    w, h = size
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        return Problem(
            str(path),
            f"image of {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.3g}:1, beyond "
            f"{limits.max_aspect_ratio:g}:1; crop it",
        )
    try:
        choice = selector.select(*size)
    except ValueError as e:
        return Problem(str(path), str(e))
    upscale = max(choice.resized[0] / w, choice.resized[1] / h)
    if upscale > limits.max_upscale:
        return Problem(
            str(path),
            f"image of {w}x{h} would be enlarged {upscale:.1f}x to fill its "
            f"{choice.bucket[0]}x{choice.bucket[1]} bucket, beyond {limits.max_upscale:g}x; "
            "use a larger image or a lower resolution",
        )
    return Item(str(path), frames, caption, size, choice, _stamp(frames), di, si)


def _candidates(subset: SubsetConfig) -> tuple[list[tuple[Path, tuple[str, ...], str]], list[Problem]]:
    """(path, frames, caption) of every sample in a subset, and caption problems."""
    if not subset.image_dir.is_dir():
        raise DatasetConfigError(
            f"{subset.where}: key 'image_dir' = '{subset.image_dir}' is not a folder "
            f"(relative paths are from the working directory {Path.cwd()})"
        )
    out, problems = [], []
    n = subset.video_frames
    if n is None:
        sources = [(p, (str(p),)) for p in list_images(subset.image_dir)]
    else:
        sources = []
        for clip in list_clips(subset.image_dir):
            frames = list_images(clip)
            if len(frames) < n:
                problems.append(Problem(str(clip), f"clip has {len(frames)} frames, video_frames = {n}"))
            else:
                sources.append((clip, tuple(str(f) for f in frames[:n])))
    for path, frames in sources:
        cap_path = (
            path.with_name(path.stem + subset.caption_extension)
            if n is None
            else path.with_name(path.name + subset.caption_extension)
        )
        try:
            caption = read_caption_file(cap_path, keep_all_lines=subset.enable_wildcard)
        except CaptionFileError as e:
            problems.append(Problem(str(cap_path), str(e)))
            continue
        if caption is None:
            if subset.class_tokens is None:
                problems.append(Problem(str(path), f"missing or empty caption file {cap_path} and no class_tokens"))
                continue
            caption = subset.class_tokens
        out.append((path, frames, caption))
    return out, problems


def _selector(d: DatasetConfig) -> BucketSelector:
    return BucketSelector(
        d.resolution, d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps, d.bucket_no_upscale
    )


def scan_dataset(
    config: DataConfig,
    on_error: Literal["skip", "raise"] = "skip",
    workers: int = 8,
    limits: ImageLimits = ImageLimits(),
    caption_length: CaptionLength | None = ESTIMATED_CLIP,
) -> ScanResult:
    """Find, caption and decode every sample of `config`.

    Problems (unreadable image, an image beyond `limits`, missing caption without class_tokens,
    short clip) are logged with their paths and skipped, or with on_error="raise" all raised at
    once as DatasetError. A dataset left with no sample raises DatasetError naming it and its
    folders. Captions longer than `caption_length` allows are warnings (logged, kept in
    ``warnings``), once per file."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    items: list[list[Item]] = []
    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for di, d in enumerate(config.datasets):
            sel = _selector(d)
            jobs = []
            for si, s in enumerate(d.subsets):
                cands, probs = _candidates(s)
                problems += probs
                jobs += [pool.submit(_check_item, p, fr, cap, sel, di, si, limits) for p, fr, cap in cands]
            results = [j.result() for j in jobs]
            problems += [r for r in results if isinstance(r, Problem)]
            items.append([r for r in results if isinstance(r, Item)])
    if problems:
        listing = "\n  ".join(map(str, problems))
        if on_error == "raise":
            raise DatasetError(f"{config.source}: {len(problems)} bad input file(s) (on_error='raise'):\n  {listing}")
        logger.warning("%s: skipping %d bad input file(s):\n  %s", config.source, len(problems), listing)
    warnings = _long_captions(config, items, caption_length) if caption_length is not None else []
    if warnings:
        logger.warning(
            "%s: %d caption(s) longer than the text encoder reads:\n  %s",
            config.source,
            len(warnings),
            "\n  ".join(map(str, warnings)),
        )
    for di, d in enumerate(config.datasets):
        if not items[di]:
            dirs = ", ".join(str(s.image_dir) for s in d.subsets)
            kind = "clip folders" if d.video_frames else "images (" + " ".join(IMAGE_EXTENSIONS) + ")"
            raise DatasetError(
                f"{d.where}: no usable {kind} in {dirs}"
                + (f" ({len(problems)} skipped, see above)" if problems else "")
            )
    return ScanResult(config, items, problems, warnings)


def _long_captions(config: DataConfig, items: list[list[Item]], length: CaptionLength) -> list[Problem]:
    out = []
    for d, ds_items in zip(config.datasets, items):
        for it in ds_items:
            why = caption_too_long(it.caption, d.subsets[it.subset], length)
            if why is not None:
                out.append(Problem(it.path, why))
    return out
