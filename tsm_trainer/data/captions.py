"""Captions: reading caption files and kohya's per-step caption processing.

All randomness comes from the `rng` argument (numpy Generator), so a (seed, epoch, position)
-derived generator reproduces the same caption after a resume.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsm_trainer.data.config import SubsetConfig


class CaptionFileError(ValueError):
    """A caption file exists but cannot be used (not UTF-8)."""


def read_caption_file(path: Path, keep_all_lines: bool = False) -> str | None:
    """Caption text of `path`, or None when the file is missing or holds only whitespace.

    kohya uses the first line; with `keep_all_lines` (enable_wildcard) the non-empty lines
    joined by newlines, one of which is picked per step."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CaptionFileError(f"caption file is not UTF-8: {path} ({e})") from None
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return None
    return "\n".join(lines) if keep_all_lines else lines[0]


def _split(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def _expand_wildcards(caption: str, rng: np.random.Generator) -> str:
    """One line of a multi-line caption, then `{a|b|c}` -> one choice. `{{` / `}}` are literal braces."""
    lines = caption.split("\n")
    caption = lines[int(rng.integers(len(lines)))] if len(lines) > 1 else caption
    open_mark, close_mark = "\x00<", "\x00>"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)

    def choose(m: re.Match) -> str:
        options = m.group(1).split("|")
        return options[int(rng.integers(len(options)))]

    caption = re.sub(r"\{([^}]+)\}", choose, caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(caption: str, subset: SubsetConfig, rng: np.random.Generator, epoch: int = 0) -> str:
    """The caption the text encoder sees this step; ``epoch`` counts from 0 (kohya's epoch 1).

    Order (kohya): prefix/suffix; whole-caption dropout (rate, or every n-th epoch) -> "";
    wildcards (else first line); if shuffle/tag-dropout: keep the first `keep_tokens` tags
    (or the part before `keep_tokens_separator`, and after its second occurrence) fixed,
    shuffle and drop the others, join with ", "; secondary_separator -> caption_separator.
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    n = subset.caption_dropout_every_n_epochs
    if dropped or (n > 0 and (epoch + 1) % n == 0):  # kohya counts epochs from 1: epochs n, 2n, ... drop
        return ""
    caption = _expand_wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]

    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        sep, ksep = subset.caption_separator, subset.keep_tokens_separator
        suffix: list[str] = []
        if ksep and ksep in caption:
            fixed_part, flex_part = caption.split(ksep, 1)
            if ksep in flex_part:
                flex_part, suffix_part = flex_part.split(ksep, 1)
                suffix = _split(suffix_part, sep)
            fixed, flex = _split(fixed_part, sep), _split(flex_part, sep)
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tokens[: subset.keep_tokens], tokens[subset.keep_tokens :]
        if subset.shuffle_caption:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


@dataclass(frozen=True)
class CaptionLength:
    """How long a caption may be: ``count(text)`` tokens (no special tokens) against the ``limit``
    that ``reader`` (a text encoder, named in messages) reads; the rest is cut."""

    count: Callable[[str], int]
    limit: int
    reader: str


_TOKEN_LOWER_BOUND = re.compile(r"[^\W\d_]+|\d|[^\w\s]+")


def estimate_clip_tokens(text: str) -> int:
    """A lower bound of CLIP's token count: its tokenizer splits words, single digits and runs of
    punctuation apart and may split a word further, never joins them."""
    return len(_TOKEN_LOWER_BOUND.findall(text.lower()))


# Used when the scan has no tokenizer: reports only captions surely longer than CLIP's 75 tokens.
ESTIMATED_CLIP = CaptionLength(estimate_clip_tokens, 75, "CLIP (estimated)")


def tokenizer_caption_length(tokenizer, max_length: int = 512) -> CaptionLength:
    """CaptionLength of a Hugging Face tokenizer: the limit is its ``model_max_length`` (at most
    ``max_length``) less the special tokens it adds (CLIP: 77 - 2 = 75)."""
    specials = len(tokenizer("").input_ids)
    limit = min(int(tokenizer.model_max_length), max_length) - specials
    return CaptionLength(
        lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
        limit,
        type(tokenizer).__name__.replace("TokenizerFast", "").replace("Tokenizer", ""),
    )


def caption_too_long(caption: str, subset: SubsetConfig, length: CaptionLength) -> str | None:
    """Why ``caption`` (each line of a wildcard caption, with prefix and suffix) is cut, or None."""
    for line in caption.split("\n"):
        text = " ".join(t for t in (subset.caption_prefix, line, subset.caption_suffix) if t)
        n = length.count(text)
        if n > length.limit:
            words = text.split()
            lo, hi = 0, len(words)  # the most words that fit: binary search, the count is monotone in them
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if length.count(" ".join(words[:mid])) <= length.limit else (lo, mid - 1)
            kept = " ".join(words[max(0, lo - 3) : lo])
            return (
                f"caption has {n} tokens, {length.reader} reads {length.limit}: everything after "
                f"'...{kept}' is ignored; shorten it"
            )
    return None
