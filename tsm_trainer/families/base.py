"""The interface of a model family: :class:`FamilySpec` (what it is: names, targets, key naming,
timestep space, metadata strings, how to recognise it) and :class:`TrainingFamily` (what the
trainer does with it: load, encode, noise, predict, sample). One module per family declares both;
``tsm_trainer.families`` registers them. This module imports only torch and the standard library,
so the core can read specs without loading any model library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

ConfigGetter = Callable[[str], Any]
"""``get(key)``: a denoiser config value (diffusers config object, config.json dict), None if absent."""


@dataclass(frozen=True)
class FamilySpec:
    """Everything about a model family that is data.

    Attributes:
        name: short id (``sd1``, ``sdxl``, ...): ``--family`` choice, registry key.
        denoiser_targets: LoRA target patterns per denoiser class name; ``"*"`` is the fallback.
        text_encoder_targets: patterns per text-encoder kind (``clip``, ``t5``).
        timestep_space: ``ddpm`` or ``flow`` (docs/design.md section 1).
        base_model_version: kohya's ``ss_base_model_version``.
        modelspec_architecture: ``modelspec.architecture`` of a LoRA for this family.
        v2: kohya's ``ss_v2``.
        resolution: the family's native training resolution (``modelspec.resolution``).
        denoiser_classes: denoiser class names (diffusers and sd-scripts) that are this family whatever
            their config.
        config_classes: class names shared with other families, claimed when ``accepts_config`` says so.
        accepts_config: ``accepts_config(get, denoiser)`` -> bool for a ``config_classes`` denoiser;
            ``denoiser`` is None when only a folder's config.json is read. Predicates of families that
            share a class must be exclusive.
        transformer_classes: diffusers classes whose keys go under ``lora_transformer`` (diffusers
            layout); every other denoiser uses ``lora_unet``.
        sgm_unet_names: a diffusers UNet of this family is saved under SGM module names (SDXL).
        sigma_input_classes: denoiser classes that receive sigma in [0, 1] instead of t (t = sigma * T).
        forge_predictors: Forge predictor classes of this family whose UNet receives sigma.
        metadata_needles: lower-case fragments of a LoRA's ``modelspec.architecture`` /
            ``ss_base_model_version`` that name this family (tried in registry order).
        single_file_refusal: (what, key fragment) of a single-file checkpoint of this family that the
            trainer refuses (read from a diffusers folder only); None if single files are read or unknown.
        checkpoint_roots: bake: ((key root, LoRA prefix), ...) of the text encoders in an
            original-layout single-file checkpoint; empty if bake does not serve the family.
    """

    name: str
    denoiser_targets: dict[str, tuple[str, ...]]
    text_encoder_targets: dict[str, tuple[str, ...]]
    timestep_space: str
    base_model_version: str
    modelspec_architecture: str
    v2: bool = False
    resolution: int = 512
    denoiser_classes: tuple[str, ...] = ()
    config_classes: tuple[str, ...] = ()
    accepts_config: Callable[[ConfigGetter, nn.Module | None], bool] | None = field(default=None, compare=False)
    transformer_classes: tuple[str, ...] = ()
    sgm_unet_names: bool = False
    sigma_input_classes: tuple[str, ...] = ()
    forge_predictors: tuple[str, ...] = ()
    metadata_needles: tuple[str, ...] = ()
    single_file_refusal: tuple[str, str] | None = None
    checkpoint_roots: tuple[tuple[str, str], ...] = ()

    def denoiser_patterns(self, denoiser: nn.Module) -> tuple[str, ...]:
        return self.denoiser_targets.get(type(denoiser).__name__, self.denoiser_targets["*"])

    def claims(self, class_name: str, get: ConfigGetter, denoiser: nn.Module | None = None) -> bool:
        """Whether a denoiser of this class and config is this family."""
        if class_name in self.denoiser_classes:
            return True
        return (
            class_name in self.config_classes
            and self.accepts_config is not None
            and bool(self.accepts_config(get, denoiser))
        )


@dataclass
class Components:
    """A loaded base model. ``denoiser`` is the UNet/transformer the network is applied to; ``family``
    the spec the folder or file was recognised as (set by :meth:`TrainingFamily.load`)."""

    denoiser: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    vae: nn.Module
    noise_scheduler: object
    family: FamilySpec | None = None


class TrainingFamily(Protocol):
    """What the trainer does with a family. ``B`` batch, ``C/h/w`` latent channels and size,
    ``L/D`` text tokens and width. Instantiated with ``prediction_type`` (``auto`` reads the model)."""

    specs: ClassVar[tuple[FamilySpec, ...]]
    """The families this class trains (sd.py: SD 1.x and SD 2.x)."""
    prediction_type: str
    num_train_timesteps: int

    def load(
        self,
        path: str,
        weight_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        tokenizer_cache_dir: str | None = None,
    ) -> Components:
        """The base model of a diffusers folder (or a single file where the family reads one)."""

    def encode_text(self, c: Components, captions: list[str], device) -> dict:
        """Keyword conditioning of :meth:`predict` (e.g. ``encoder_hidden_states`` (B, L, D))."""

    def encode_images(
        self, c: Components, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, C, h, w) as the denoiser reads them."""

    def noisy_input_and_target(
        self, c: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, regression target), both shaped like ``latents``; ``timesteps`` (B,)."""

    def predict(self, c: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The denoiser's prediction, shaped like ``noisy``."""

    def sample(self, c: Components, prompts: list[str], steps: int, guidance: float, size: int, seed: int) -> list:
        """PIL images of ``prompts``."""

    def loss_weights(self, c: Components, timesteps: torch.Tensor, min_snr_gamma: float) -> torch.Tensor | None:
        """Per-sample loss weights (B,), or None."""


def load_kwargs(weight_dtype: torch.dtype | None) -> dict:
    """``from_pretrained`` arguments: local files only, and an explicit dtype (float32 unless given) so
    that weights stored in float16 / bfloat16 on disk are upcast instead of kept in their disk dtype."""
    return {"local_files_only": True, "torch_dtype": weight_dtype or torch.float32}


def single_file_components(
    path: str,
    family_names: tuple[str, ...],
    prediction_type: str,
    weight_dtype: torch.dtype | None,
    vae_dtype: torch.dtype | None,
    tokenizer_cache_dir: str | None,
) -> tuple[Components, str]:
    """(Components, prediction type) of a single-file SD 1.x / 2.x / SDXL checkpoint; the file's family
    must be one of ``family_names``."""
    from tsm_trainer.base_models.loading import BaseModelError
    from tsm_trainer.base_models.single_file import (
        build_scheduler,
        build_text_encoder,
        build_tokenizers,
        build_unet,
        build_vae,
        describe,
        settle_prediction_type,
    )

    model = describe(path, prediction_type)
    if model.family not in family_names:
        raise BaseModelError(f"{path}: holds an {model.family} model, not {'/'.join(family_names)}")
    dtype = weight_dtype or torch.float32
    unet = build_unet(model, True, dtype)
    settle_prediction_type(model, unet)
    encoders = [build_text_encoder(model, i, True, dtype) for i in range(len(model.text_encoders))]
    components = Components(
        unet,
        encoders,
        build_tokenizers(model, tokenizer_cache_dir),
        build_vae(model, True, vae_dtype or torch.float32),
        build_scheduler(model),
    )
    return components, model.prediction_type


@dataclass(frozen=True)
class FolderLayout:
    """The parts of a diffusers folder a family loads, as (class, subfolder). The classes are diffusers /
    transformers classes, imported by the family inside :meth:`folder_layout` (so specs load no library).
    Every folder also has ``vae/`` (AutoencoderKL) and ``scheduler/`` (``scheduler``)."""

    denoiser: tuple[Any, str]
    text_encoders: tuple[tuple[Any, str], ...]
    tokenizers: tuple[tuple[Any, str], ...]
    scheduler: Any


def load_folder(
    folder: str,
    layout: FolderLayout,
    weight_dtype: torch.dtype | None,
    vae_dtype: torch.dtype | None,
    tokenizer_cache_dir: str | None,
) -> Components:
    """Components of a diffusers folder: the denoiser and text encoders in ``weight_dtype``, the VAE in
    ``vae_dtype`` (float32 unless given, whatever the files store), local files only."""
    from diffusers import AutoencoderKL

    note_folder_tokenizer(folder, tokenizer_cache_dir)
    kw = load_kwargs(weight_dtype)
    denoiser_class, denoiser_folder = layout.denoiser
    return Components(
        denoiser_class.from_pretrained(folder, subfolder=denoiser_folder, **kw),
        [cls.from_pretrained(folder, subfolder=sub, **kw) for cls, sub in layout.text_encoders],
        [cls.from_pretrained(folder, subfolder=sub, local_files_only=True) for cls, sub in layout.tokenizers],
        AutoencoderKL.from_pretrained(folder, subfolder="vae", **load_kwargs(vae_dtype)),
        layout.scheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
    )


def sample_images(pipe, prompts: list[str], steps: int, guidance: float, size: int, seed: int, **extra) -> list:
    """PIL images of ``prompts`` from a diffusers pipeline: size x size, ``steps`` steps, a fixed seed,
    no progress bar, no autograd; ``extra`` goes to the pipeline's call."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
            **extra,
        ).images


def require_folder(path: str, family: str) -> None:
    """Single files are read for SD 1.x / 2.x / SDXL only: stop early for the other families."""
    import os

    if os.path.isfile(path):
        from tsm_trainer.base_models.loading import BaseModelError

        raise BaseModelError(
            f"{path}: a single file; the {family} family is read from a diffusers folder only "
            "(model_index.json with transformer/ or unet/, text_encoder/, vae/, scheduler/ ...)"
        )


def note_folder_tokenizer(path: str, tokenizer_cache_dir: str | None) -> None:
    """kohya's --tokenizer_cache_dir serves single files; a diffusers folder brings its own tokenizer(s)."""
    if tokenizer_cache_dir:
        import logging

        logging.getLogger(__name__).warning(
            "--tokenizer_cache_dir %s is not used: %s is a diffusers folder with its own tokenizer(s)",
            tokenizer_cache_dir,
            path,
        )
