"""Tiny SD-shaped models for the shapes world: configs, a local CLIP BPE tokenizer, pipeline folder I/O.

Shapes follow Stable Diffusion 1.x so every SD tool (sd-scripts, diffusers' StableDiffusionPipeline,
LoRA key naming) treats the base model as an SD1 checkpoint: an ``AutoencoderKL`` (64x64x3 images
<-> 16x16x4 latents), a ``UNet2DConditionModel`` with cross-attention transformer blocks, a
``CLIPTextModel`` and a ``CLIPTokenizer`` (``model_max_length=77``), the SD noise schedule
(scaled-linear betas 0.00085 .. 0.012 over 1000 steps, epsilon prediction).
"""

from __future__ import annotations

import json
import os
from collections import Counter

from demo_world import shapes

IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_DIM = 64
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    layers_per_block=1,
    block_out_channels=(32, 64, 96),
    # no attention at the full 16x16 latent resolution (it would triple the CPU cost); cross-attention
    # transformer blocks at 8x8, 4x4 and in the mid block
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


# ----------------------------------------------------------------------------------------------------
# Tokenizer: real CLIP BPE files learned from this world's words


def _word_symbols(word: str) -> tuple:
    return tuple(word[:-1]) + (word[-1] + "</w>",)


def learn_bpe(words) -> tuple[dict, list]:
    """Learn BPE merges until every word is one token (ties broken alphabetically, so deterministic).

    Returns (vocab, merges) in CLIP's format: the special tokens, every letter with and without
    ``</w>`` (so any lowercase text tokenizes without unknown tokens), each merge result."""
    words = sorted(set(words))
    segs = {w: _word_symbols(w) for w in words}
    merges = []
    while True:
        pairs = Counter()
        for seg in segs.values():
            for a, b in zip(seg, seg[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = tuple(out)
    vocab = {BOS: 0, EOS: 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        for tok in (c, c + "</w>"):
            vocab.setdefault(tok, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def write_tokenizer(folder, words=shapes.WORDS):
    """Write vocab.json + merges.txt (+ tokenizer config) for a ``CLIPTokenizer`` to ``folder``; return it."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab, merges = learn_bpe(words)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    for w in words:  # every word of the world is a single token
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise AssertionError(f"word {w!r} tokenized to {tok.convert_ids_to_tokens(ids)}")
    tok.save_pretrained(folder)
    return tok


def make_tokenizer(words=shapes.WORDS):
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d, words)
        return CLIPTokenizer.from_pretrained(d)


# ----------------------------------------------------------------------------------------------------
# Models and the pipeline folder


def make_models(seed: int = 0, tokenizer=None):
    """Fresh (random-init) vae, unet, text_encoder, tokenizer."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(len(tokenizer)))
    return vae, unet, text_encoder, tokenizer


def make_scheduler(kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind]
    return cls.from_config(DDIMScheduler(**SCHEDULER_CONFIG).config)


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
}


def save_pipeline(folder, vae, unet, text_encoder, words=shapes.WORDS, dtype=None):
    """Write a diffusers StableDiffusionPipeline folder (loadable with
    ``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)``)."""
    import diffusers

    os.makedirs(folder, exist_ok=True)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        m = model if dtype is None else _cast_copy(model, dtype)
        m.save_pretrained(os.path.join(folder, name), safe_serialization=True)
    make_scheduler("ddim").save_pretrained(os.path.join(folder, "scheduler"))
    write_tokenizer(os.path.join(folder, "tokenizer"), words)
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return folder


def _cast_copy(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def load_pipeline(folder, dtype=None):
    """The base model as a StableDiffusionPipeline (fp32 on CPU unless ``dtype`` says otherwise)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    if dtype is not None and dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def folder_size(folder) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
