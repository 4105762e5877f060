"""Attribute score of the shapes world: the small-scale stand-in for T2I-CompBench's colour / shape /
texture columns. Generate an image per prompt and count how often the detector reads back the
colour, shape and background the prompt asked for.

Held-out combinations: :func:`heldout_combos` picks one background per (shape, colour) pair, so a
model trained on the other combinations has seen every colour, shape and background word, but never
the held-out combinations: scoring them measures composition, not memorised captions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from demo_world import shapes

ATTRIBUTES = ("colour", "shape", "background")


def all_combos(domain: str = "target") -> list[dict]:
    """Every (shape, colour, background) of ``domain`` as attribute dicts."""
    return [
        {"shape": s, "colour": c, "background": b}
        for s in shapes.SHAPES
        for c in shapes.DOMAINS[domain]
        for b in shapes.BACKGROUNDS
    ]


def heldout_combos(domain: str = "target") -> list[dict]:
    """One background per (shape, colour) pair, rotating: |shapes| x |colours| combinations."""
    n = len(shapes.BACKGROUNDS)
    return [
        a
        for a in all_combos(domain)
        if (
            shapes.SHAPES.index(a["shape"])
            + shapes.DOMAINS[domain].index(a["colour"])
            + shapes.BACKGROUNDS.index(a["background"])
        )
        % n
        == 0
    ]


def score_images(images: Sequence, attrs: Sequence[dict]) -> dict:
    """Fraction of images whose detected colour / shape / background (and all three) match ``attrs``."""
    if len(images) != len(attrs) or not images:
        raise ValueError(
            f"score_images needs one attribute dict per image (got {len(images)} images, {len(attrs)} attribute dicts)"
        )
    hits = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    for image, want in zip(images, attrs):
        seen = shapes.detect_attributes(image)
        ok = [seen[k] == want[k] for k in ATTRIBUTES]
        for k, v in zip(ATTRIBUTES, ok):
            hits[k] += v
        hits["all"] += all(ok)
    return {k: v / len(images) for k, v in hits.items()} | {"n": len(images)}


def attribute_score(
    generate: Callable[[list[str], int], list], attrs: Sequence[dict], seeds: Sequence[int] = (0,)
) -> dict:
    """Score ``generate(prompts, seed) -> images`` on the captions of ``attrs``, once per seed."""
    prompts = [shapes.caption(a) for a in attrs]
    images = [image for seed in seeds for image in generate(prompts, seed)]
    return score_images(images, list(attrs) * len(seeds))
