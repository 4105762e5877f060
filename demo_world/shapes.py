"""A deterministic procedural "shapes" world: coloured shapes on plain or textured backgrounds.

Every image shows one saturated shape on an achromatic background, so the world can be rendered,
captioned and *read back* (``detect_attributes``) with simple image analysis:

* shapes: circle, square, triangle, star, cross (upright; position and size jitter)
* base colours: red, green, blue, yellow, purple, orange (small per-channel jitter)
* backgrounds: white, black, gray, striped (horizontal stripes), checkered
* captions: ``"a red circle on a white background"``

The **target domain** is a colour shift: the same shapes and backgrounds in colours the base model
never saw, named by words it never saw (pink, cyan, brown). Fine-tuning on it has to teach both the
new hues and the new words, and ``detect_attributes`` scores whether it did.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
BASE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (235, 215, 0),
    "purple": (150, 50, 210),
    "orange": (250, 140, 0),
}
TARGET_COLOURS = {
    "pink": (255, 110, 190),
    "cyan": (0, 200, 220),
    "brown": (140, 70, 20),
}
COLOURS = {**BASE_COLOURS, **TARGET_COLOURS}
BACKGROUNDS = ("white", "black", "gray", "striped", "checkered")
DOMAINS = {"base": tuple(BASE_COLOURS), "target": tuple(TARGET_COLOURS)}

_PLAIN = {"white": 240, "black": 20, "gray": 128}
_TEXTURE_LEVELS = (205, 70)  # light / dark gray of stripes and checkers
_PERIOD = 8 / 64  # texture period as a fraction of the image size
_SUPERSAMPLE = 4
_COLOUR_JITTER = 12

# Every word the world's captions use (the tokenizer vocabulary is built from these).
WORDS = ("a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS)


def _rng(rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    return rng


def sample_attributes(rng, domain: str = "base") -> dict:
    """Draw ``{"shape", "colour", "background"}`` uniformly from ``domain`` ("base" or "target")."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    rng = _rng(rng)
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": DOMAINS[domain][rng.integers(len(DOMAINS[domain]))],
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
    }


def caption(attrs: dict) -> str:
    return f"a {attrs['colour']} {attrs['shape']} on a {attrs['background']} background"


def domain_of(attrs: dict) -> str:
    return "target" if attrs["colour"] in TARGET_COLOURS else "base"


def _shape_polygon(shape: str, cx: float, cy: float, r: float):
    """Outline of ``shape`` centred at (cx, cy) with half-size r (None for the circle)."""
    if shape == "square":
        s = 0.82 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.1 * r + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        w = 0.36 * r
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(background: str, n: int, phase_x: float, phase_y: float) -> np.ndarray:
    if background in _PLAIN:
        return np.full((n, n), _PLAIN[background], np.float32)
    period = _PERIOD * n
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    band_y = np.floor((yy + phase_y * period) / (period / 2)).astype(np.int64)
    if background == "striped":
        light = band_y % 2 == 0
    elif background == "checkered":
        band_x = np.floor((xx + phase_x * period) / (period / 2)).astype(np.int64)
        light = (band_x + band_y) % 2 == 0
    else:
        raise ValueError(f"unknown background {background!r}; known: {BACKGROUNDS}")
    return np.where(light, _TEXTURE_LEVELS[0], _TEXTURE_LEVELS[1]).astype(np.float32)


def render(shape: str, colour: str, background: str, size: int = 64, rng=None, jitter: bool = True) -> Image.Image:
    """Render one image (RGB, ``size`` x ``size``); position, size, hue and texture phase jitter come from
    ``rng`` (a numpy Generator or an int seed; None means seed 0). ``jitter=False`` centres a fixed-size shape.
    ``colour`` is a colour name or an (r, g, b) tuple."""
    if isinstance(colour, str) and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {tuple(COLOURS)}")
    base_rgb = np.asarray(COLOURS[colour] if isinstance(colour, str) else colour, np.int64)
    rng = _rng(rng)
    n = size * _SUPERSAMPLE
    if jitter:
        r = rng.uniform(0.22, 0.36) * n
        margin = r + 0.04 * n
        cx, cy = rng.uniform(margin, n - margin, size=2)
        rgb = np.clip(base_rgb + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
        phase_x, phase_y = rng.uniform(0, 1, size=2)
    else:
        r, cx, cy, rgb, phase_x, phase_y = 0.3 * n, n / 2, n / 2, base_rgb, 0.0, 0.0
    bg = _background(background, n, phase_x, phase_y)
    mask_img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask_img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, r), fill=255)
    mask = np.asarray(mask_img, np.float32)[..., None] / 255.0
    img = bg[..., None] * (1 - mask) + rgb.astype(np.float32)[None, None, :] * mask
    big = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return big.resize((size, size), Image.BOX)


def render_attributes(attrs: dict, size: int = 64, rng=None) -> Image.Image:
    return render(attrs["shape"], attrs["colour"], attrs["background"], size=size, rng=rng)


def combo(attrs: dict) -> tuple[str, str, str]:
    return attrs["shape"], attrs["colour"], attrs["background"]


def sample(rng, domain: str = "base", size: int = 64, exclude=frozenset()):
    """One (image, attributes, caption) draw from ``domain``, redrawn while its (shape, colour,
    background) is in ``exclude`` (held-out combinations)."""
    rng = _rng(rng)
    attrs = sample_attributes(rng, domain)
    while combo(attrs) in exclude:
        attrs = sample_attributes(rng, domain)
    return render_attributes(attrs, size=size, rng=rng), attrs, caption(attrs)


def write_dataset(
    folder,
    n: int,
    domain: str = "base",
    seed: int = 0,
    size: int = 64,
    caption_extension: str = ".txt",
    exclude=frozenset(),
):
    """Write ``n`` images of ``domain`` to ``folder`` in kohya layout: ``00000.png`` with its caption in
    ``00000.txt`` next to it (point a kohya dataset TOML's ``image_dir`` at ``folder``), plus
    ``attributes.jsonl`` (one ``{"file", "shape", "colour", "background", "caption"}`` per line).
    No image shows a (shape, colour, background) in ``exclude``. Deterministic given ``seed``.
    Returns the list of records."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        img, attrs, text = sample(rng, domain, size, exclude)
        name = f"{i:05d}"
        img.save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + caption_extension), "w") as f:
            f.write(text + "\n")
        records.append({"file": name + ".png", **attrs, "caption": text})
    with open(os.path.join(folder, "attributes.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    return records


def random_colour(rng) -> tuple:
    """A random chromatic colour of any hue, light to dark (for training a world-agnostic autoencoder:
    it must reproduce pastel pink and dark brown as well as the base palette)."""
    import colorsys

    rng = _rng(rng)
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def make_autoencoder_arrays(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """Renders for the autoencoder: all shapes and backgrounds in random colours of any hue
    (no colour names, so the target domain's hues are reconstructable but its words stay unseen)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        attrs = sample_attributes(rng, "base")
        images[i] = np.asarray(render(attrs["shape"], random_colour(rng), attrs["background"], size, rng))
    return images


def make_arrays(n: int, domain: str = "base", seed: int = 0, size: int = 64):
    """``n`` renders as a uint8 array (n, size, size, 3) with their attributes and captions (in memory)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    attrs, captions = [], []
    for i in range(n):
        img, a, text = sample(rng, domain, size)
        images[i] = np.asarray(img)
        attrs.append(a)
        captions.append(text)
    return images, attrs, captions


# ----------------------------------------------------------------------------------------------------
# Attribute detector (the scorer for generated images)

_TEMPLATE = 24


def _saturation_mask(rgb: np.ndarray) -> np.ndarray:
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    return (sat > 0.3) & (mx > 50)


def _crop_normalise(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, x0 = int(math.floor(y0)), int(math.floor(x0))
    y1, x1 = int(math.ceil(y1)) + 1, int(math.ceil(x1)) + 1
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8), "L")
    return np.asarray(crop.resize((_TEMPLATE, _TEMPLATE), Image.BILINEAR), np.float32) / 255.0


@lru_cache(maxsize=1)
def _templates() -> dict:
    out = {}
    for shape in SHAPES:
        img = np.asarray(render(shape, "red", "black", size=128, jitter=False), np.float32)
        out[shape] = _crop_normalise(_saturation_mask(img))
    return out


def _colour_name(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.asarray([COLOURS[k] for k in names], np.float32)
    return names[int(np.argmin(((palette - rgb[None]) ** 2).sum(-1)))]


def detect_attributes(image) -> dict:
    """Read ``{"shape", "colour", "background"}`` back from an image of this world (PIL image or HxWx3 array).

    The shape is the saturated pixels (backgrounds are achromatic); its colour is their median, named
    by the nearest palette colour (base and target); its outline, cropped to its bounding box, is
    matched against each shape's template. The background is read from the remaining pixels: flat
    (white / gray / black by brightness) or textured (striped if rows are uniform, else checkered).
    A missing shape gives ``shape`` and ``colour`` None."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    mask = _saturation_mask(rgb)
    out = {"shape": None, "colour": None, "background": None}
    norm = _crop_normalise(mask)
    if norm is not None and mask.sum() >= 12:
        scores = {
            s: float(np.minimum(norm, t).sum() / max(np.maximum(norm, t).sum(), 1e-6)) for s, t in _templates().items()
        }
        out["shape"] = max(scores, key=scores.get)
        mx = rgb.max(-1)
        sat = (mx - rgb.min(-1)) / np.maximum(mx, 1.0)
        core = mask & (sat >= np.percentile(sat[mask], 50))  # the fully covered pixels, not the edges
        out["colour"] = _colour_name(np.median(rgb[core], axis=0))
    # background: pixels away from the shape
    grown = mask.copy()
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            grown |= np.roll(mask, shift, axis=axis)
    lum = rgb.mean(-1)
    bg = ~grown
    if bg.sum() < 16:
        bg = ~mask
    values = lum[bg]
    if values.size == 0:
        return out
    if values.std() < 30:
        mean = values.mean()
        out["background"] = "black" if mean < 75 else "white" if mean > 185 else "gray"
        return out
    masked = np.where(bg, lum, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows / columns that are all shape have no std
        row_std = np.nanmean(np.nanstd(masked, axis=1)) if np.isfinite(np.nanstd(masked, axis=1)).any() else 0.0
        col_std = np.nanmean(np.nanstd(masked, axis=0)) if np.isfinite(np.nanstd(masked, axis=0)).any() else 0.0
    out["background"] = "striped" if row_std < 0.5 * col_std else "checkered"
    return out
