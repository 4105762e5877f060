"""One validation pass over every option, at start, before any model is loaded: types were checked
by the parser; here ranges, combinations (an option that does not apply in this mode is an error
naming both) and paths. Each failure is an OptionError whose message names the flag."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os

from tsm_trainer.families import get_family
from tsm_trainer.training.config import FIELDS, OptionError, TrainConfig
from tsm_trainer.training.network_plugin import TSM_MODULE, TSM_OPTIONS, parse_network_args

# dataset flags that become defaults of a --dataset_config (kohya's argparse fallback) or build a
# --train_data_dir dataset; kohya's names -> the dataset TOML's
DATASET_FLAGS = {
    "resolution": "resolution",
    "train_batch_size": "batch_size",
    "caption_extension": "caption_extension",
    "shuffle_caption": "shuffle_caption",
    "caption_separator": "caption_separator",
    "keep_tokens": "keep_tokens",
    "keep_tokens_separator": "keep_tokens_separator",
    "secondary_separator": "secondary_separator",
    "enable_wildcard": "enable_wildcard",
    "caption_prefix": "caption_prefix",
    "caption_suffix": "caption_suffix",
    "caption_dropout_rate": "caption_dropout_rate",
    "caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "flip_aug": "flip_aug",
    "random_crop": "random_crop",
    "enable_bucket": "enable_bucket",
    "min_bucket_reso": "min_bucket_reso",
    "max_bucket_reso": "max_bucket_reso",
    "bucket_reso_steps": "bucket_reso_steps",
    "bucket_no_upscale": "bucket_no_upscale",
}


def _given(config: TrainConfig, name: str) -> bool:
    return getattr(config, name) != FIELDS[name].default


def _fail(message: str):
    raise OptionError(message)


def _at_least(config: TrainConfig, name: str, low, optional: bool = True):
    value = getattr(config, name)
    if value is None and optional:
        return
    if value is None or value < low:
        _fail(f"--{name} {value} must be >= {low}")


def _finite(
    config: TrainConfig, name: str, low: float | None = None, high: float | None = None, high_open: bool = False
):
    value = getattr(config, name)
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not math.isfinite(v):
            _fail(f"--{name} {v} is not a finite number")
        if low is not None and v < low:
            _fail(f"--{name} {v} must be >= {low}")
        if high is not None and (v >= high if high_open else v > high):
            _fail(f"--{name} {v} must be {'<' if high_open else '<='} {high}")


def resolve_tsm_options(config: TrainConfig) -> TrainConfig:
    """tsm_* keys of --network_args move into the trainer's --tsm_* options (the trainer samples
    timesteps and prints the budget from them); the same option given both ways must agree."""
    args = parse_network_args(config.network_args)
    changes = {}
    for key in TSM_OPTIONS:
        if key not in args:
            continue
        value = args[key]
        value = int(value) if key == "tsm_interval" and value.lstrip("-").isdigit() else value
        if key == "tsm_interval" and not isinstance(value, int):
            _fail(f"--network_args tsm_interval={args[key]!r} is not an integer")
        if _given(config, key) and getattr(config, key) != value:
            _fail(f"--{key} {getattr(config, key)} and --network_args {key}={args[key]} disagree; give one")
        changes[key] = value
    if changes.get("tsm_scales") and config.tsm_stage == "vanilla":
        _fail("--tsm_stage vanilla trains one LoRA (scale 1): drop --network_args tsm_scales")
    return dataclasses.replace(config, **changes) if changes else config


def _check_ranges(c: TrainConfig) -> None:
    _at_least(c, "max_train_steps", 1, optional=False)
    for name in (
        "max_train_epochs",
        "gradient_accumulation_steps",
        "save_every_n_steps",
        "save_every_n_epochs",
        "save_last_n_steps",
        "save_last_n_epochs",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "validate_every_n_steps",
        "network_dim",
        "train_batch_size",
        "clip_skip",
        "lr_scheduler_num_cycles",
        "sample_steps",
        "min_bucket_reso",
        "max_bucket_reso",
        "distill_fake_updates",
        "distill_fake_rank",
        "caption_dropout_every_n_epochs",
    ):
        _at_least(c, name, 1 if name != "caption_dropout_every_n_epochs" else 0)
    for name in ("lr_warmup_steps", "keep_tokens", "min_timestep", "max_timestep"):
        _at_least(c, name, 0)
    _at_least(c, "sample_resolution", 8)
    _at_least(c, "bucket_reso_steps", 8)
    for name in (
        "learning_rate",
        "max_grad_norm",
        "noise_offset",
        "min_snr_gamma",
        "prior_loss_weight",
        "unet_lr",
        "text_encoder_lr",
        "network_alpha",
        "weight_decay",
        "sample_guidance",
        "distill_fake_lr",
        "distill_gan_weight",
        "distill_real_guidance",
    ):
        _finite(c, name, low=0.0)
    _finite(c, "lr_scheduler_power")
    _finite(c, "scale_weight_norms", low=0.0)
    if c.scale_weight_norms is not None and c.scale_weight_norms <= 0:
        _fail(f"--scale_weight_norms {c.scale_weight_norms} must be > 0")
    if c.learning_rate <= 0:
        _fail(f"--learning_rate {c.learning_rate} must be > 0")
    for name in ("network_dropout", "caption_dropout_rate", "caption_tag_dropout_rate"):
        _finite(c, name, low=0.0, high=1.0, high_open=True)
    _finite(c, "validation_split", low=0.0, high=1.0, high_open=True)
    if c.tsm_interval < -1:
        _fail(f"--tsm_interval {c.tsm_interval}: an expert index >= 0, or -1 for all")
    if c.min_timestep is not None and c.max_timestep is not None and c.min_timestep >= c.max_timestep:
        _fail(f"--min_timestep {c.min_timestep} must be < --max_timestep {c.max_timestep}")
    name = c.output_name
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or os.sep in name
        or (os.altsep and os.altsep in name)
    ):
        _fail(f"--output_name {name!r}: a plain file name stem (not empty, no '/', not starting with '.')")


def _check_tsm(c: TrainConfig) -> None:
    from tsm_trainer.core.intervals import parse_scales

    if c.network_module != TSM_MODULE:
        bad = [f"--{n}" for n in (*TSM_OPTIONS, "tsm_recipe", "timestep_sampling") if _given(c, n)]
        if bad:
            _fail(f"{', '.join(bad)} only apply with --network_module {TSM_MODULE} (not {c.network_module})")
        return
    try:
        scales = parse_scales(c.tsm_scales)
    except ValueError as e:
        _fail(f"--tsm_scales {c.tsm_scales!r}: {e}")
    if c.tsm_stage == "vanilla" and _given(c, "tsm_scales"):
        _fail("--tsm_scales does not apply with --tsm_stage vanilla (one LoRA, scale 1)")
    if c.tsm_stage != "assemble":
        for n in ("tsm_experts", "tsm_mixture"):
            if _given(c, n):
                _fail(f"--{n} only applies with --tsm_stage assemble (not {c.tsm_stage})")
    else:
        if not c.tsm_experts:
            _fail("--tsm_stage assemble needs --tsm_experts (the fostered files, one per scale)")
        if c.tsm_interval >= 0:
            _fail("--tsm_interval only applies when fostering (not with --tsm_stage assemble)")
    if c.tsm_interval >= 0:
        n = 1 if c.tsm_stage == "vanilla" else scales[0]
        if c.tsm_interval >= n:
            _fail(f"--tsm_interval {c.tsm_interval}: the scale has {n} experts (0..{n - 1})")
        if c.timestep_sampling == "stratified":
            _fail("--timestep_sampling stratified does not apply with --tsm_interval (one interval is trained)")
    if c.tsm_recipe == "paper":
        bad = [
            f"--{n}"
            for n in ("tsm_stage", "tsm_scales", "tsm_experts", "tsm_interval", "network_weights")
            if _given(c, n)
        ]
        if bad:
            _fail(f"--tsm_recipe paper sets the stages itself: drop {', '.join(bad)}")
    from tsm_trainer.core.network_args import NETWORK_ARGS
    from tsm_trainer.core.network_args import parse_network_args as parse_tsm_args
    from tsm_trainer.training.network_plugin import tsm_network_args

    for key in tsm_network_args(c):
        if key not in NETWORK_ARGS:
            close = difflib.get_close_matches(key, list(NETWORK_ARGS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            _fail(f"--network_args {key}: unknown key for {TSM_MODULE}; {hint}(keys: {', '.join(NETWORK_ARGS)})")
    try:
        parse_tsm_args(tsm_network_args(c))
    except ValueError as e:
        _fail(f"--network_args: {e}")


def _check_combinations(c: TrainConfig) -> None:
    pairs = [  # (option given, option it needs, why)
        ("cache_dir", "cache_latents_to_disk", "the folder of the on-disk latent cache"),
        ("validate_every_n_steps", "validation_split", "validation needs a held-out split"),
        ("save_last_n_steps", "save_every_n_steps", "it prunes step saves"),
        ("save_last_n_epochs", "save_every_n_epochs", "it prunes epoch saves"),
        ("dim_from_weights", "network_weights", "dims are read from that file"),
        ("log_prefix", "logging_dir", "the prefix of the run folder in it"),
        ("log_with", "logging_dir", "TensorBoard writes there"),
        ("reg_data_dir", "train_data_dir", "regularization images go with a folder dataset"),
        ("sample_every_n_steps", "sample_prompts", "the prompts to sample"),
        ("sample_every_n_epochs", "sample_prompts", "the prompts to sample"),
    ]
    for option, needed, why in pairs:
        if _given(c, option) and not _given(c, needed):
            _fail(f"--{option} needs --{needed} ({why})")
    if c.sample_prompts and not (c.sample_every_n_steps or c.sample_every_n_epochs):
        _fail("--sample_prompts needs --sample_every_n_steps or --sample_every_n_epochs (when to sample)")
    if c.network_train_unet_only and c.network_train_text_encoder_only:
        _fail("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if c.text_encoder_lr is not None and c.network_train_unet_only:
        _fail("--text_encoder_lr does not apply with --network_train_unet_only (no text-encoder LoRA trains)")
    if c.unet_lr is not None and c.network_train_text_encoder_only:
        _fail("--unet_lr does not apply with --network_train_text_encoder_only")
    if c.dataset_config and c.train_data_dir:
        _fail("--dataset_config and --train_data_dir exclude each other (the TOML lists the image folders)")
    if c.train_data_dir and c.resolution is None:
        _fail("--train_data_dir needs --resolution (e.g. 512 or 512,768)")
    if not c.dataset_config and not c.train_data_dir:
        _fail("a dataset is required: --train_data_dir (N_concept folders) or --dataset_config (kohya TOML)")
    if _given(c, "weight_decay") and any(a.split("=", 1)[0].strip() == "weight_decay" for a in c.optimizer_args or []):
        _fail("--weight_decay and --optimizer_args weight_decay=... both given; give one")
    if c.lr_scheduler_num_cycles is not None and c.lr_scheduler != "cosine_with_restarts":
        _fail(f"--lr_scheduler_num_cycles only applies with --lr_scheduler cosine_with_restarts (not {c.lr_scheduler})")
    if c.lr_scheduler_power is not None and c.lr_scheduler != "polynomial":
        _fail(f"--lr_scheduler_power only applies with --lr_scheduler polynomial (not {c.lr_scheduler})")
    if c.lr_warmup_steps and c.lr_scheduler == "constant":
        _fail("--lr_warmup_steps has no effect with --lr_scheduler constant; use constant_with_warmup")
    if c.lr_warmup_steps and c.lr_warmup_steps >= c.max_train_steps and c.max_train_epochs is None:
        _fail(f"--lr_warmup_steps {c.lr_warmup_steps} must be < --max_train_steps {c.max_train_steps}")
    family = None if c.family == "auto" else get_family(c.family)
    if c.v2 and family is not None and not family.v2:
        _fail(f"--v2 and --family {c.family} disagree")
    if c.v_parameterization and family is not None and family.timestep_space == "flow":
        _fail(f"--v_parameterization does not apply to --family {c.family} (rectified flow)")


def _check_unimplemented(c: TrainConfig) -> None:
    """Declared kohya options whose other values are not implemented: refused, never ignored."""
    if c.save_model_as != "safetensors":
        _fail(f"--save_model_as {c.save_model_as}: only safetensors is written (never pickle)")
    if c.clip_skip is not None and c.clip_skip != 1:
        _fail(f"--clip_skip {c.clip_skip}: only 1 (the last layer) is implemented yet")
    if c.sample_sampler != "ddim":
        _fail(f"--sample_sampler {c.sample_sampler}: only ddim is implemented yet")
    if c.log_with not in (None, "tensorboard"):
        _fail(f"--log_with {c.log_with}: only tensorboard is implemented")
    if c.logging_dir and importlib.util.find_spec("tensorboard") is None:
        _fail(
            "--logging_dir: TensorBoard logging needs the tensorboard package (pip install tensorboard, or "
            "pip install 'tsm-trainer[train]'); without --logging_dir the loss goes to the console only"
        )
    if c.xformers and importlib.util.find_spec("xformers") is None:
        _fail(
            "--xformers: xformers is not installed (pip install xformers, CUDA only); without the flag PyTorch's "
            "SDPA attention is used"
        )
    if c.xformers and c.sdpa:
        _fail("--xformers and --sdpa exclude each other")
    if c.train_data_dir:
        from tsm_trainer import data

        if not hasattr(data, "folder_dataset_config"):
            _fail(
                "--train_data_dir: folder datasets are not implemented yet; use --dataset_config with a kohya "
                "dataset TOML (examples in dataset_configs/)"
            )
    from tsm_trainer.training.network_plugin import import_network_module
    from tsm_trainer.training.optimizers import parse_optimizer_args, resolve

    try:
        import_network_module(c.network_module)
        resolve(c.optimizer_type)
        parse_optimizer_args(c.optimizer_args)
    except ValueError as e:
        _fail(str(e))


def _check_task(c: TrainConfig) -> None:
    from tsm_trainer.training.build import DISTILL_UNSUPPORTED

    if c.task == "distill":
        bad = [f"--{n}" for n in DISTILL_UNSUPPORTED if _given(c, n)]
        if bad:
            _fail(f"--task distill does not support {', '.join(bad)} (yet)")
    else:
        bad = [f"--{n}" for n in FIELDS if n.startswith("distill_") and _given(c, n)]
        if bad:
            _fail(f"{', '.join(bad)} only apply with --task distill")


def _writable_dir(path: str, flag: str) -> None:
    """``path`` is a folder we can write, or can be created."""
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        _fail(f"{flag} {path}: exists and is not a folder")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        _fail(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(f"{flag} {path}: {probe} is not writable")


def _check_paths(c: TrainConfig) -> None:
    if not c.pretrained_model_name_or_path:
        _fail("--pretrained_model_name_or_path is required (a local diffusers folder)")
    if not os.path.exists(c.pretrained_model_name_or_path):
        _fail(
            f"--pretrained_model_name_or_path {c.pretrained_model_name_or_path}: no such file or folder "
            "(models are read from disk only)"
        )
    files = [
        ("dataset_config", c.dataset_config),
        ("sample_prompts", c.sample_prompts),
        ("network_weights", c.network_weights),
    ]
    files += [("tsm_experts", p) for p in c.tsm_experts.split(",") if p] if c.tsm_recipe == "none" else []
    for flag, path in files:
        if path and not os.path.isfile(path):
            _fail(f"--{flag} {path}: no such file")
    if c.network_weights and not c.network_weights.endswith(".safetensors"):
        _fail(f"--network_weights {c.network_weights}: only .safetensors files are loaded (never pickle)")
    for flag, path in (("train_data_dir", c.train_data_dir), ("reg_data_dir", c.reg_data_dir)):
        if path and not os.path.isdir(path):
            _fail(f"--{flag} {path}: no such folder")
    if c.resume and c.resume != "latest" and not os.path.isdir(c.resume):
        _fail(f"--resume {c.resume}: no such folder (a state folder written with --save_state, or 'latest')")
    if c.sample_prompts:
        from tsm_trainer.training.sample_prompts import read_sample_prompts

        try:
            read_sample_prompts(c.sample_prompts)
        except ValueError as e:
            _fail(str(e))
    _writable_dir(c.output_dir, "--output_dir")
    final = os.path.join(c.output_dir, f"{c.output_name}.safetensors")
    if os.path.isdir(final):
        _fail(f"--output_name {c.output_name}: {final} is a folder")
    for flag, path in (("logging_dir", c.logging_dir), ("cache_dir", c.cache_dir)):
        if path:
            _writable_dir(path, f"--{flag}")


def check_config(config: TrainConfig) -> TrainConfig:
    """Check every option; returns the config with the TSM options of --network_args resolved."""
    config = resolve_tsm_options(config)
    _check_ranges(config)
    _check_task(config)
    _check_tsm(config)
    _check_combinations(config)
    _check_unimplemented(config)
    _check_paths(config)
    return config
