"""Build a :class:`Trainer` / ``DistillTrainer`` from a :class:`TrainConfig` (the base model, read once with
its family detected from the folder's configs, and the dataset) and run one stage or a recipe. The library
side of ``train_tsm.py``: evaluation, tools and bench import this; ``training/cli.py`` only parses and reports."""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from tsm_trainer.base_models.loading import frozen_weight_dtype
from tsm_trainer.data import LatentCache, ScanResult, TrainDataset, load_dataset_config, scan_dataset
from tsm_trainer.data.captions import tokenizer_caption_length
from tsm_trainer.families import detect_folder_family, get_training_family, training_class
from tsm_trainer.training.checkpoint import latest_state
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.loop import Trainer
from tsm_trainer.training.output_dir import training_output
from tsm_trainer.training.run_record import data_identity
from tsm_trainer.training.validate import DATASET_FLAGS, check_config


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
DISTILL_UNSUPPORTED = (
    "tsm_recipe",
    "tsm_interval",
    "timestep_sampling",
    "network_module",
    "network_args",
    "network_weights",
    "dim_from_weights",
    "network_train_text_encoder_only",
    "network_dropout",
    "unet_lr",
    "text_encoder_lr",
    "scale_weight_norms",
    "optimizer_type",
    "optimizer_args",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "gradient_accumulation_steps",
    "mixed_precision",
    "gradient_checkpointing",
    "min_snr_gamma",
    "noise_offset",
    "min_timestep",
    "max_timestep",
    "xformers",
    "save_every_n_steps",
    "save_every_n_epochs",
    "save_state",
    "save_precision",
    "sample_every_n_steps",
    "sample_every_n_epochs",
    "resume",
    "validation_split",
    "logging_dir",
    "max_train_epochs",
    "prior_loss_weight",
)


def dataset_options(config: TrainConfig) -> dict:
    """The dataset flags given on the command line, under the dataset TOML's names."""
    out = {}
    for flag, key in DATASET_FLAGS.items():
        value = getattr(config, flag)
        if value is None:
            continue
        if flag == "resolution":
            try:
                sizes = [int(v) for v in str(value).split(",")]
            except ValueError:
                raise ValueError(f"--resolution {value!r}: expected '512' or '512,768' (width,height)") from None
            if len(sizes) not in (1, 2):
                raise ValueError(f"--resolution {value!r}: expected '512' or '512,768' (width,height)")
            value = sizes[0] if len(sizes) == 1 else sizes
        out[key] = value
    return out


def load_data_config(config: TrainConfig):
    """The DataConfig of --dataset_config (with the dataset flags as its defaults, as kohya) or of
    --train_data_dir / --reg_data_dir folders."""
    options = dataset_options(config)
    if config.train_data_dir:
        from tsm_trainer.data import folder_dataset_config

        if "resolution" not in options:
            raise ValueError("--train_data_dir needs --resolution (e.g. 512 or 512,768)")
        return folder_dataset_config(config.train_data_dir, config.reg_data_dir or None, **options)
    return load_dataset_config(config.dataset_config, defaults=options)


def build(config: TrainConfig, log=print) -> Trainer:
    """The trainer of one stage. The base model's family is detected once, from the folder's configs (or
    the single file's header), and its components are loaded once, carrying that family."""
    config = check_config(config)
    path = config.pretrained_model_name_or_path
    spec = detect_folder_family(path)
    name = spec.name
    # A family's training class may serve several (sd1 and sd2): --family names any of them.
    if config.family != "auto" and training_class(config.family) is not training_class(name):
        raise ValueError(f"--family {config.family}, but {path} holds a {name} model")
    if config.v2 and not spec.v2:
        raise ValueError(f"--v2, but {path} holds a {name} model")
    if config.v_parameterization and spec.timestep_space != "ddpm":
        raise ValueError(f"--v_parameterization does not apply to {path} (a {name} model)")
    family = get_training_family(name, "v_prediction" if config.v_parameterization else "auto")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    components = family.load(
        path,
        weight_dtype=frozen_weight_dtype(config.mixed_precision, device),
        tokenizer_cache_dir=config.tokenizer_cache_dir or None,
    )
    components.family = spec
    data_config = load_data_config(config)
    scan = scan_dataset(
        data_config,
        on_error="skip" if config.skip_bad_files else "raise",
        caption_length=tokenizer_caption_length(components.tokenizers[0]),
    )
    for problem in scan.problems:
        log(f"skipped: {problem}")
    for warning in scan.warnings:
        log(f"warning: {warning}")
    train_scan, held_scan = split_validation(scan, config.validation_split)
    cache = None
    if config.cache_latents or config.cache_latents_to_disk:

        def encode(pixels):
            with torch.no_grad():
                return family.encode_images(components, pixels, torch.Generator().manual_seed(config.seed)).float()

        cache_dir = (
            (config.cache_dir or os.path.join(config.output_dir, "latent_cache"))
            if config.cache_latents_to_disk
            else None
        )
        cache = LatentCache(encode, cache_dir=cache_dir, namespace=f"{path}:{name}")
    dataset = TrainDataset(train_scan, seed=config.seed, latent_cache=cache)
    if cache is not None:
        log(f"cached latents of {dataset.cache_latents()} images")
    validation = []
    if held_scan is not None:
        held = TrainDataset(held_scan, seed=config.seed + 1, shuffle=False)
        validation = [held.batch(0, i) for i in range(len(held))]
    batch_size = max(d.batch_size for d in data_config.datasets)
    if config.max_train_epochs:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        steps = config.max_train_epochs * math.ceil(len(dataset) / world / config.gradient_accumulation_steps)
        log(f"--max_train_epochs {config.max_train_epochs}: {steps} steps")
        config = dataclasses.replace(config, max_train_steps=steps)

    make_batches = dataset.epoch_batches  # lazy: a resume skips batches without loading them

    if config.task == "distill":
        from tsm_trainer.training.distill import DistillTrainer

        return DistillTrainer(config, family, components, make_batches, log=log)
    resolution = max((d.resolution for d in data_config.datasets), key=lambda r: r[0] * r[1])
    trainer = Trainer(
        config,
        family,
        components,
        make_batches,
        batch_size,
        validation,
        log=log,
        batches_per_epoch=len(dataset),
        resolution=resolution,
    )
    trainer.data_identity = data_identity(dataset, config.dataset_config)
    return trainer


def paper_recipe(config: TrainConfig) -> list[TrainConfig]:
    """The paper's two-stage recipe (appendix A): foster n=8, foster n=1, assemble [8, 1] with
    the experts frozen; each stage gets ``max_train_steps`` and its own folder."""
    out = lambda stage: os.path.join(config.output_dir, f"{config.output_name}-{stage}")  # noqa: E731
    common = dict(tsm_recipe="none", tsm_interval=-1, resume=config.resume)
    return [
        dataclasses.replace(config, tsm_stage="foster", tsm_scales="8", output_dir=out("foster8"), **common),
        dataclasses.replace(config, tsm_stage="foster", tsm_scales="1", output_dir=out("foster1"), **common),
        dataclasses.replace(
            config,
            tsm_stage="assemble",
            tsm_scales="8,1",
            output_dir=out("assembled"),
            tsm_experts=f"{out('foster8')}/{config.output_name}.safetensors,"
            f"{out('foster1')}/{config.output_name}.safetensors",
            **common,
        ),
    ]


def run(config: TrainConfig, log=print) -> str:
    """One stage, or every stage of a recipe; a stage whose file exists is done (resume skips it)."""
    config = check_config(config)  # everything is checked before the first model loads
    stages = paper_recipe(config) if config.tsm_recipe == "paper" else [config]
    path = ""
    for i, stage in enumerate(stages, 1):
        path = os.path.join(stage.output_dir, f"{stage.output_name}.safetensors")
        if len(stages) > 1:
            if os.path.isfile(path):
                log(f"stage {i}/{len(stages)} ({stage.tsm_stage} {stage.tsm_scales}) already done: {path}")
                continue
            log(f"stage {i}/{len(stages)}: {stage.tsm_stage} {stage.tsm_scales} -> {stage.output_dir}")
        with training_output(stage.output_dir, stage.output_name, stage.max_train_steps, stage.overwrite, log):
            if stage.resume == "latest":
                stage = dataclasses.replace(stage, resume=latest_state(stage.output_dir, stage.output_name))
            path = build(stage, log).run()
    return path
