"""Evaluate files against one held-out draw: the numbers behind ``tools/evaluate.py`` and the
reproduction benchmark."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tsm_trainer.core.file_format import TSMFileError, load_file
from tsm_trainer.core.metadata import tsm_metadata
from tsm_trainer.core.network import TSMNetwork
from tsm_trainer.families import detect_family
from tsm_trainer.files.export import plain_lora_as_tsm
from tsm_trainer.training.objective import denoising_loss, frozen_text_cache, loss_by_interval


def load_lora_file(path: str, components, num_train_timesteps: int, multiplier: float = 1.0) -> TSMNetwork:
    """Apply a native TSM file, or a plain kohya LoRA (read as a fostered n = 1 file), to
    ``components`` (denoiser and text encoders) and hook the denoiser for t. ``remove()`` undoes it.

    Raises:
        TSMFileError: unreadable, or not a TSM / kohya LoRA file, or it doesn't fit the model.
    """
    tensors, metadata = load_file(path)
    if "tsm.format_version" not in metadata:
        try:
            tensors = plain_lora_as_tsm(tensors)
        except ValueError as e:
            raise TSMFileError(f"{path}: neither a TSM file nor a plain kohya LoRA: {e}") from None
        metadata = dict(metadata) | tsm_metadata(
            [1],
            "foster",
            "asymmetric",
            num_train_timesteps,
            (getattr(components, "family", None) or detect_family(components.denoiser)).timestep_space,
        )
    network = TSMNetwork.from_file(
        path, components.denoiser, components.text_encoders, multiplier=multiplier, tensors=tensors, metadata=metadata
    )
    network.apply()
    network.attach(components.denoiser)
    network.to(next(components.denoiser.parameters()).device)
    network.eval()
    return network


@dataclass
class Evaluation:
    """Per-file results. ``losses[label]``: mean held-out loss in each of ``bins`` equal t-intervals."""

    bins: int
    num_train_timesteps: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)

    def interval_losses(self, label: str, n: int = 8) -> list[float]:
        """The ``bins`` losses averaged into ``n`` intervals (every bin holds the same samples)."""
        values = self.losses[label]
        if self.bins % n:
            raise ValueError(f"{self.bins} bins do not split into {n} intervals")
        k = self.bins // n
        return [sum(values[i * k : (i + 1) * k]) / k for i in range(n)]

    def mean_loss(self, label: str) -> float:
        return sum(self.losses[label]) / len(self.losses[label])


def _label(path: str, taken: set) -> str:
    label = os.path.splitext(os.path.basename(path))[0]
    while label in taken:
        label += "'"
    return label


def evaluate_files(
    family,
    components,
    batches: Sequence[dict],
    files: Sequence[str],
    labels: Sequence[str] | None = None,
    include_base: bool = True,
    bins: int = 32,
    seed: int = 1234,
    prompts: Sequence[str] = (),
    sample_steps: int = 20,
    guidance: float = 5.0,
    size: int = 64,
    sample_seed: int = 0,
    score=None,
    log=print,
) -> Evaluation:
    """Held-out loss per t-bin (and samples of ``prompts``; ``score(generate) -> dict`` if given) of the
    base model and each file, one at a time on the same components. Every file sees the same draw of
    latents, noise and timesteps (:func:`loss_by_interval` with ``seed``).

    ``batches``: held-out {"pixels" (B, 3, H, W) in [-1, 1], "captions"} batches.
    """
    device = next(components.denoiser.parameters()).device
    T = family.num_train_timesteps
    result = Evaluation(bins, T)
    runs: list[tuple[str, str | None]] = [("base model", None)] if include_base else []
    taken = {label for label, _ in runs}
    for i, path in enumerate(files):
        label = labels[i] if labels else _label(path, taken)
        taken.add(label)
        runs.append((label, path))

    text_cache = frozen_text_cache(family, components, device)  # cleared per model: a file's TE LoRA changes it

    def loss_fn(batch, t, generator):
        return denoising_loss(family, components, batch, t, generator, text_cache.encode, device)

    def generate(prompt_list, s):
        return family.sample(components, list(prompt_list), sample_steps, guidance, size, s)

    for label, path in runs:
        network = None if path is None else load_lora_file(path, components, T)
        text_cache.clear()
        try:
            with torch.no_grad():
                result.losses[label] = loss_by_interval(loss_fn, batches, family, T, bins, seed)
                if prompts:
                    result.samples[label] = generate(prompts, sample_seed)
                if score is not None:
                    result.scores[label] = score(generate)
        finally:
            if network is not None:
                network.remove()
        log(
            f"{label}: mean held-out loss {result.mean_loss(label):.5f}"
            + (f", scores {result.scores[label]}" if label in result.scores else "")
        )
    return result
