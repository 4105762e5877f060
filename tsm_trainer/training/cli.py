"""``train_tsm.py``: parse options, load the base model and the dataset, run the trainer."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from ..data import LatentCache, ScanResult, TrainDataset, load_dataset_config, scan_dataset
from .config import TrainConfig, load_config
from .families import get_training_family
from .loop import NonFiniteLossError, Trainer


def detect_family_name(folder: str) -> str:
    """The family of a diffusers folder, from its configs (no weights are loaded)."""
    from ..base_model import load_components
    from ..targets import detect_family

    _, denoiser, _ = load_components(folder)
    return detect_family(denoiser).name


def split_validation(scan: ScanResult, fraction: float) -> tuple[ScanResult, ScanResult | None]:
    """Hold out every k-th item of each dataset (k = round(1 / fraction)), deterministically."""
    if fraction <= 0:
        return scan, None
    if fraction >= 1:
        raise ValueError(f"--validation_split {fraction} must be < 1")
    k = max(2, round(1 / fraction))
    train = [[it for i, it in enumerate(items) if i % k] for items in scan.items]
    held = [[it for i, it in enumerate(items) if not i % k] for items in scan.items]
    if not any(held) or not all(train):
        raise ValueError(f"--validation_split {fraction} leaves an empty training or validation set")
    return ScanResult(scan.config, train, scan.problems), ScanResult(scan.config, held, [])


# Options the distillation loop does not implement (yet): refused rather than silently ignored.
DISTILL_UNSUPPORTED = ("tsm_recipe", "tsm_interval", "timestep_sampling", "train_text_encoder", "network_dropout",
                       "optimizer", "lr_scheduler", "lr_warmup_steps", "gradient_accumulation_steps", "mixed_precision",
                       "gradient_checkpointing", "min_snr_gamma", "noise_offset", "xformers", "save_every_n_steps",
                       "save_every_n_epochs", "sample_every_n_steps", "resume", "validation_split", "logging_dir")


def check_task_options(config: TrainConfig) -> None:
    """Options that the chosen --task would ignore stop with an error naming them."""
    from .config import FIELDS

    changed = lambda names: [f"--{n}" for n in names if getattr(config, n) != FIELDS[n].default]  # noqa: E731
    if config.task == "distill" and changed(DISTILL_UNSUPPORTED):
        raise ValueError(f"--task distill does not support {', '.join(changed(DISTILL_UNSUPPORTED))} (yet)")
    distill_only = [n for n in FIELDS if n.startswith("distill_")]
    if config.task != "distill" and changed(distill_only):
        raise ValueError(f"{', '.join(changed(distill_only))} only apply with --task distill")


def build(config: TrainConfig, log=print) -> Trainer:
    check_task_options(config)
    name = detect_family_name(config.pretrained_model)
    if config.family != "auto" and config.family != name and {config.family, name} != {"sd1", "sd2"}:
        raise ValueError(f"--family {config.family}, but {config.pretrained_model} holds a {name} model")
    family = get_training_family(name, config.prediction_type)
    components = family.load(config.pretrained_model)
    data_config = load_dataset_config(config.dataset_config)
    scan = scan_dataset(data_config, on_error="skip" if config.skip_bad_files else "raise")
    for problem in scan.problems:
        log(f"skipped: {problem}")
    train_scan, held_scan = split_validation(scan, config.validation_split)
    cache = None
    if config.cache_latents:
        def encode(pixels):
            with torch.no_grad():
                return family.encode_images(components, pixels, torch.Generator().manual_seed(config.seed)).float()

        cache = LatentCache(encode, cache_dir=config.cache_dir or None, namespace=f"{config.pretrained_model}:{name}")
    dataset = TrainDataset(train_scan, seed=config.seed, latent_cache=cache)
    if cache is not None:
        log(f"cached latents of {dataset.cache_latents()} images")
    validation = []
    if held_scan is not None:
        held = TrainDataset(held_scan, seed=config.seed + 1, shuffle=False)
        validation = [held.batch(0, i) for i in range(len(held))]
    batch_size = max(d.batch_size for d in data_config.datasets)

    def make_batches(epoch: int):
        return (dataset.batch(epoch, i) for i in range(len(dataset)))

    if config.task == "distill":
        from .distill import DistillTrainer

        return DistillTrainer(config, family, components, make_batches, log=log)
    resolution = max((d.resolution for d in data_config.datasets), key=lambda r: r[0] * r[1])
    return Trainer(config, family, components, make_batches, batch_size, validation, log=log,
                   batches_per_epoch=len(dataset), resolution=resolution)


def latest_state(output_dir: str) -> str:
    """The newest ``state-N`` folder in ``output_dir``, or "" when there is none."""
    if not os.path.isdir(output_dir):
        return ""
    states = [d for d in os.listdir(output_dir) if d.startswith("state-") and d[6:].isdigit()]
    return os.path.join(output_dir, max(states, key=lambda d: int(d[6:]))) if states else ""


def paper_recipe(config: TrainConfig) -> list[TrainConfig]:
    """The paper's two-stage recipe (appendix A): foster n=8, foster n=1, assemble [8, 1] with
    the experts frozen; each stage gets ``max_train_steps`` and its own folder."""
    out = lambda stage: os.path.join(config.output_dir, f"{config.output_name}-{stage}")  # noqa: E731
    common = dict(tsm_recipe="none", tsm_interval=-1, resume=config.resume)
    return [
        dataclasses.replace(config, tsm_stage="foster", tsm_scales="8", output_dir=out("foster8"), **common),
        dataclasses.replace(config, tsm_stage="foster", tsm_scales="1", output_dir=out("foster1"), **common),
        dataclasses.replace(config, tsm_stage="assemble", tsm_scales="8,1", output_dir=out("assembled"),
                            tsm_experts=f"{out('foster8')}/{config.output_name}.safetensors,"
                                        f"{out('foster1')}/{config.output_name}.safetensors", **common),
    ]


def run(config: TrainConfig, log=print) -> str:
    """One stage, or every stage of a recipe; a stage whose file exists is done (resume skips it)."""
    stages = paper_recipe(config) if config.tsm_recipe == "paper" else [config]
    path = ""
    for i, stage in enumerate(stages, 1):
        path = os.path.join(stage.output_dir, f"{stage.output_name}.safetensors")
        if len(stages) > 1:
            if os.path.isfile(path):
                log(f"stage {i}/{len(stages)} ({stage.tsm_stage} {stage.tsm_scales}) already done: {path}")
                continue
            log(f"stage {i}/{len(stages)}: {stage.tsm_stage} {stage.tsm_scales} -> {stage.output_dir}")
        if stage.resume == "latest":
            stage = dataclasses.replace(stage, resume=latest_state(stage.output_dir))
        path = build(stage, log).run()
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        run(load_config(argv))
    except (ValueError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
