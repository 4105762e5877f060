"""Training options, declared once, under sd-scripts' names: each field is a ``--flag`` of
``train_tsm.py`` and a key of a ``--config_file`` TOML (kohya's format: sections are flattened,
the command line wins).

Fields default to kohya's meaning; ``None`` means "not given" where kohya's default is None.
Older names of this trainer stay accepted as hidden aliases (``ALIASES``). sd-scripts flags this
trainer does not implement are refused by name (``kohya_flags.REFUSED``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field

from tsm_trainer.families import family_names
from tsm_trainer.training.kohya_flags import REFUSED

# Groups in --help, in sd-scripts' order (the add_*_arguments functions of train_util.py, then
# train_network.py's own), followed by this trainer's.
GROUPS = {
    "model": "model (sd-scripts add_sd_models_arguments)",
    "dataset": "dataset (add_dataset_arguments; with --dataset_config these are defaults for its tables, as in kohya)",
    "training": "training (add_training_arguments)",
    "optimizer": "optimizer (add_optimizer_arguments, add_custom_train_arguments)",
    "network": "network (train_network.py)",
    "tsm": "TimeStep Master (this trainer)",
    "distill": "distillation (--task distill)",
}


def family_choices() -> tuple[str, ...]:
    """``--family``: auto or a registered family (read when the parser is built)."""
    return ("auto", *family_names())


def _opt(default, help: str, group: str, choices: tuple | typing.Callable[[], tuple] | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


def _choices(f: dataclasses.Field) -> tuple | None:
    """A field's choices; a callable (``--family``) is read now, so the registry decides."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


OPTIMIZERS = (
    "AdamW",
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "Lion8bit",
    "PagedLion8bit",
    "Lion",
    "SGDNesterov",
    "SGDNesterov8bit",
    "AdEMAMix8bit",
    "PagedAdEMAMix8bit",
    "Adafactor",
    "Prodigy",
)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    # -- model ------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = _opt(
        "",
        "base model: a local diffusers folder, or a single-file checkpoint (.safetensors; SD 1.x, 2.x, SDXL)",
        "model",
    )
    v2: bool = _opt(False, "the base model is SD 2.x (checked against the model)", "model")
    v_parameterization: bool = _opt(False, "v-prediction loss (SD 2.x 768-v); default: the model's scheduler", "model")
    tokenizer_cache_dir: str = _opt(
        "",
        "single-file checkpoints: a folder to keep the CLIP tokenizer in (filled on "
        "first use); default: built from the installed CLIP vocabulary",
        "model",
    )
    # -- dataset ----------------------------------------------------------------------------------
    dataset_config: str = _opt("", "kohya dataset config TOML", "dataset")
    train_data_dir: str = _opt("", "kohya folder dataset: sub-folders named N_concept (N repeats)", "dataset")
    reg_data_dir: str = _opt("", "regularization images, same layout as --train_data_dir", "dataset")
    prior_loss_weight: float = _opt(1.0, "loss weight of regularization images", "dataset")
    resolution: str = _opt(None, "training resolution: '512' or '512,768' (width,height)", "dataset")
    train_batch_size: int = _opt(None, "batch size (default 1)", "dataset")
    caption_extension: str = _opt(None, "caption file extension (default .caption)", "dataset")
    shuffle_caption: bool = _opt(None, "shuffle comma-separated caption tags", "dataset")
    caption_separator: str = _opt(None, "tag separator (default ',')", "dataset")
    keep_tokens: int = _opt(None, "keep the first N tags in place when shuffling", "dataset")
    keep_tokens_separator: str = _opt(None, "keep the part before this separator in place", "dataset")
    secondary_separator: str = _opt(None, "separator of tags that shuffle and drop together", "dataset")
    enable_wildcard: bool = _opt(None, "{a|b} wildcards in captions", "dataset")
    caption_prefix: str = _opt(None, "text prepended to every caption", "dataset")
    caption_suffix: str = _opt(None, "text appended to every caption", "dataset")
    caption_dropout_rate: float = _opt(None, "drop the whole caption with this probability", "dataset")
    caption_dropout_every_n_epochs: int = _opt(None, "drop every caption every N epochs", "dataset")
    caption_tag_dropout_rate: float = _opt(None, "drop each tag with this probability", "dataset")
    flip_aug: bool = _opt(None, "random horizontal flips", "dataset")
    random_crop: bool = _opt(None, "random crops instead of centre crops", "dataset")
    enable_bucket: bool = _opt(None, "aspect-ratio buckets", "dataset")
    min_bucket_reso: int = _opt(None, "smallest bucket side (default 256)", "dataset")
    max_bucket_reso: int = _opt(None, "largest bucket side (default 1024)", "dataset")
    bucket_reso_steps: int = _opt(None, "bucket side step (default 64)", "dataset")
    bucket_no_upscale: bool = _opt(None, "never upscale images into a bucket", "dataset")
    cache_latents: bool = _opt(
        False, "encode every image once before training (needs random_crop and flip_aug off)", "dataset"
    )
    cache_latents_to_disk: bool = _opt(
        False,
        "cache latents as safetensors on disk (in --cache_dir, default "
        "OUTPUT_DIR/latent_cache) instead of .npz next to the images",
        "dataset",
    )
    max_data_loader_n_workers: int = _opt(
        None, "accepted for compatibility; batches are built in-process (no effect)", "dataset"
    )
    persistent_data_loader_workers: bool = _opt(False, "accepted for compatibility (no effect, see above)", "dataset")
    # -- training ---------------------------------------------------------------------------------
    output_dir: str = _opt("output", "where checkpoints and the final file go", "training")
    output_name: str = _opt("tsm", "file name stem of the saved network", "training")
    save_model_as: str = _opt("safetensors", "file format; only safetensors", "training", ("safetensors", "ckpt", "pt"))
    save_precision: str = _opt(
        None, "dtype of the saved weights (default float)", "training", ("float", "fp16", "bf16")
    )
    save_every_n_steps: int = _opt(None, "save OUTPUT_NAME-stepNNNNNNNN.safetensors every N steps", "training")
    save_every_n_epochs: int = _opt(None, "save OUTPUT_NAME-NNNNNN.safetensors every N epochs", "training")
    save_last_n_steps: int = _opt(None, "keep step saves (and states) of the last N steps only", "training")
    save_last_n_epochs: int = _opt(None, "keep the last N epoch saves (and states) only", "training")
    save_state: bool = _opt(False, "with each save, also a training state folder for --resume", "training")
    resume: str = _opt(
        "",
        "resume from a training-state folder (OUTPUT_DIR/OUTPUT_NAME-state-STEP), or 'latest' (this "
        "output name's newest state in output_dir, if any)",
        "training",
    )
    overwrite: bool = _opt(
        False, "replace a final file that holds more training steps than this run ends with", "training"
    )
    max_train_steps: int = _opt(1600, "optimizer steps", "training")
    max_train_epochs: int = _opt(None, "train this many epochs (overrides --max_train_steps)", "training")
    seed: int = _opt(42, "random seed (kohya: random when unset; here 42)", "training")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory)", "training")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", "training")
    mixed_precision: str = _opt("no", "autocast dtype", "training", ("no", "fp16", "bf16"))
    xformers: bool = _opt(False, "xformers attention (error at start when not installed)", "training")
    sdpa: bool = _opt(False, "PyTorch SDPA attention (the default anyway)", "training")
    clip_skip: int = _opt(
        None, "use the output of the N-th last text-encoder layer (only 1 is implemented)", "training"
    )
    noise_offset: float = _opt(None, "noise offset", "training")
    min_timestep: int = _opt(None, "smallest timestep drawn (default 0)", "training")
    max_timestep: int = _opt(None, "largest timestep drawn, exclusive (default T)", "training")
    lowram: bool = _opt(False, "accepted for compatibility (no effect: models load straight to the device)", "training")
    logging_dir: str = _opt("", "TensorBoard log folder; empty: off", "training")
    log_with: str = _opt(None, "tracker (tensorboard only)", "training", ("tensorboard", "wandb", "all"))
    log_prefix: str = _opt(None, "prefix of the run folder in logging_dir (LOG_PREFIX + timestamp)", "training")
    sample_every_n_steps: int = _opt(None, "write sample images every N steps", "training")
    sample_every_n_epochs: int = _opt(None, "write sample images every N epochs", "training")
    sample_prompts: str = _opt(
        "",
        "prompts file: one per line, kohya options '--w 512 --h 512 --d seed --l cfg --s steps'; or .toml/.json",
        "training",
    )
    sample_sampler: str = _opt("ddim", "sampler of the sample images (only ddim)", "training")
    # -- optimizer --------------------------------------------------------------------------------
    optimizer_type: str = _opt("AdamW", f"optimizer: {', '.join(OPTIMIZERS)}, or module.Class", "optimizer")
    optimizer_args: list[str] = _opt(
        None, "optimizer keyword arguments, key=value (e.g. weight_decay=0.1 betas=0.9,0.99)", "optimizer"
    )
    learning_rate: float = _opt(1e-4, "learning rate (kohya's default 2e-6; here 1e-4)", "optimizer")
    max_grad_norm: float = _opt(1.0, "clip gradients to this norm; 0: off", "optimizer")
    lr_scheduler: str = _opt("constant", "LR schedule", "optimizer", SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "warmup steps", "optimizer")
    lr_scheduler_num_cycles: int = _opt(None, "restarts of cosine_with_restarts (default 1)", "optimizer")
    lr_scheduler_power: float = _opt(None, "power of polynomial (default 1)", "optimizer")
    min_snr_gamma: float = _opt(None, "min-SNR loss weighting gamma", "optimizer")
    # -- network ----------------------------------------------------------------------------------
    network_module: str = _opt("networks.tsm_lora", "network module with kohya's interface", "network")
    network_dim: int = _opt(None, "rank (default: the module's, 4 for networks.tsm_lora)", "network")
    network_alpha: float = _opt(1.0, "alpha (scale = alpha / dim)", "network")
    network_dropout: float = _opt(None, "neuron dropout on the LoRA hidden", "network")
    network_args: list[str] = _opt(None, "module options, key=value (e.g. tsm_scales=8)", "network")
    network_weights: str = _opt("", "start from this network file", "network")
    dim_from_weights: bool = _opt(False, "build the network from --network_weights (its dims)", "network")
    network_train_unet_only: bool = _opt(False, "train only the denoiser's LoRA", "network")
    network_train_text_encoder_only: bool = _opt(False, "train only the text encoder's LoRA", "network")
    unet_lr: float = _opt(None, "learning rate of the denoiser's LoRA (default --learning_rate)", "network")
    text_encoder_lr: list[float] = _opt(None, "learning rate(s) of the text-encoder LoRA, one per encoder", "network")
    scale_weight_norms: float = _opt(None, "max-norm regularization of each LoRA (per expert for TSM)", "network")
    no_half_vae: bool = _opt(False, "accepted for compatibility (no effect: the VAE always runs in float32)", "network")
    training_comment: str = _opt(None, "comment stored in the file's metadata (ss_training_comment)", "network")
    validation_split: float = _opt(0.0, "held-out fraction for per-interval validation loss", "network")
    validate_every_n_steps: int = _opt(None, "validation every N steps (default: at the end)", "network")
    # -- TimeStep Master and this trainer ---------------------------------------------------------
    task: str = _opt(
        "train",
        "train: fine-tune (fostering / assembling); distill: a few-step student with one expert "
        "per step (DMD2, paper section 4.3)",
        "tsm",
        ("train", "distill"),
    )
    family: str = _opt("auto", "model family", "tsm", family_choices)
    tsm_recipe: str = _opt(
        "none",
        "paper: foster 8, foster 1, assemble [8,1], each max_train_steps, into "
        "output_dir/<output_name>-{foster8,foster1,assembled}; rerun to resume. 2.5x the steps of "
        "one run; on the demo world it did not beat vanilla LoRA trained max_train_steps (README, "
        "Which to train)",
        "tsm",
        ("none", "paper"),
    )
    tsm_stage: str = _opt(
        "foster", "vanilla (n=1 LoRA), foster (experts) or assemble (routers)", "tsm", ("vanilla", "foster", "assemble")
    )
    tsm_scales: str = _opt("8", "scales: '8' to foster, '8,1' to assemble (network_args tsm_scales)", "tsm")
    tsm_experts: str = _opt("", "assemble: fostered files, comma-separated, one per scale", "tsm")
    tsm_mixture: str = _opt("asymmetric", "assemble mixture", "tsm", ("asymmetric", "symmetric"))
    tsm_interval: int = _opt(-1, "train only this expert of the scale (timesteps restricted to it); -1: all", "tsm")
    timestep_sampling: str = _opt(
        "uniform",
        "per-sample uniform t, or stratified (each batch from one interval, rotating)",
        "tsm",
        ("uniform", "stratified"),
    )
    deterministic: bool = _opt(False, "torch deterministic algorithms", "tsm")
    skip_bad_files: bool = _opt(True, "skip unreadable images / missing captions (reported) instead of failing", "tsm")
    cache_dir: str = _opt("", "with --cache_latents_to_disk: the folder of the latent files", "tsm")
    sample_steps: int = _opt(20, "sampler steps of a prompt without --s", "tsm")
    sample_guidance: float = _opt(5.0, "guidance scale of a prompt without --l", "tsm")
    sample_resolution: int = _opt(512, "image size of a prompt without --w/--h", "tsm")
    weight_decay: float = _opt(
        1e-2, "weight decay of AdamW-style optimizers (same as --optimizer_args weight_decay=...)", "tsm"
    )
    debug: bool = _opt(False, "show the traceback of an error", "tsm")
    # -- distillation (--task distill) ------------------------------------------------------------
    distill_timesteps: str = _opt(
        "4", "student timesteps, descending ('999,749,499,249'), or a step count (evenly spaced from T-1)", "distill"
    )
    distill_fake_updates: int = _opt(5, "fake-score updates per student update (two time-scale update rule)", "distill")
    distill_fake_rank: int = _opt(16, "rank of the fake score model's LoRA", "distill")
    distill_fake_lr: float = _opt(0.0, "fake score / discriminator learning rate; 0: learning_rate", "distill")
    distill_real_guidance: float = _opt(
        1.75, "classifier-free guidance of the teacher (real) score (DMD2: 1.75)", "distill"
    )
    distill_gan_weight: float = _opt(0.01, "weight of the GAN terms; 0: distribution matching only", "distill")
    distill_step_weights: str = _opt(
        "",
        "how often each student step is trained, one weight per step; empty: the "
        "paper's for a 4-step TSM student (25,25,25,45), else uniform",
        "distill",
    )
    distill_gan_start: str = _opt(
        "",
        "fraction of training after which the GAN terms apply, one per student step "
        "or one for all; empty: the paper's (appendix A.3)",
        "distill",
    )

    @property
    def scales(self) -> list[int]:
        from tsm_trainer.core.intervals import parse_scales

        return [1] if self.tsm_stage == "vanilla" else parse_scales(self.tsm_scales)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

# Earlier names of this trainer: accepted on the command line and in TOML files, hidden in --help.
ALIASES = {
    "pretrained_model": "pretrained_model_name_or_path",
    "optimizer": "optimizer_type",
    "prediction_type": None,
    "train_text_encoder": None,
    "save_last_n": None,
    "config": "config_file",
    "caption_extention": "caption_extension",
}  # the last one: kohya's own historical typo


def _base_type(name: str) -> tuple[type, bool]:
    """(element type, is_list) of a field: ``list[float]`` -> (float, True), ``int`` -> (int, False)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


class OptionError(ValueError):
    """A bad option; the message names the flag (or file and key) and what to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: main() prints "error: ..." and exits 2
        raise OptionError(message)


def _finite_float(text: str) -> float:  # argparse names it "finite number"
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite_float.__name__ = "finite number"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train_tsm.py",
        allow_abbrev=False,
        usage="%(prog)s [--config_file FILE] [options]",
        description="Train TimeStep Master LoRA experts (or any kohya network module) with sd-scripts' "
        "train_network.py options.",
    )
    parser.add_argument(
        "--config_file",
        default=None,
        help="kohya config TOML with any of the options below (sections are flattened; the command line wins)",
    )
    parser.add_argument("--config", dest="config_file", default=None, help=argparse.SUPPRESS)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for name, f in FIELDS.items():
        kind, is_list = _base_type(name)
        group = groups[f.metadata["group"]]
        default = f.default if f.default is not None else "unset"
        help_text = f"{f.metadata['help']} (default: {default})" if f.default not in ("", None) else f.metadata["help"]
        kwargs = dict(dest=name, default=None, help=help_text)
        if kind is bool:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        arg_type = _finite_float if kind is float else kind
        if is_list:
            kwargs["nargs"] = "*"
        if name == "optimizer_type":
            arg_type = str  # case-insensitive, checked later
        group.add_argument(f"--{name}", type=arg_type, choices=_choices(f), **kwargs)
    parser.add_argument(
        "--pretrained_model", dest="pretrained_model_name_or_path", default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("--optimizer", dest="optimizer_type", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--caption_extention", dest="caption_extension", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--prediction_type",
        dest="prediction_type",
        default=None,
        choices=("auto", "epsilon", "v_prediction"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--train_text_encoder",
        dest="train_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--save_last_n", dest="save_last_n", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def known_flags() -> list[str]:
    return [*FIELDS, "config_file", *ALIASES]


def unknown_option_message(flag: str, toml: bool = False) -> str:
    """Why ``--flag`` (or TOML key ``flag``) is refused: an sd-scripts option this trainer does not
    implement (with the reason), or a typo (with the closest names)."""
    name = flag.lstrip("-").split("=", 1)[0]
    dash = "" if toml else "--"
    shown = f"key {name!r}" if toml else f"--{name}"
    if name in REFUSED:
        return f"{shown} is not supported by train_tsm.py: {REFUSED[name]}"
    close = difflib.get_close_matches(name, known_flags() + list(REFUSED), n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(dash + c for c in close)}?" if close else "; see train_tsm.py --help"
    return f"unknown {shown if not toml else shown}{hint}".replace("unknown --", "unknown option --")


def _legacy(values: dict, source: str) -> dict:
    """Translate this trainer's earlier options into the canonical ones."""
    out = dict(values)
    if "prediction_type" in out:
        value = out.pop("prediction_type")
        if value == "v_prediction":
            out["v_parameterization"] = True
        elif value not in ("auto", "epsilon"):
            raise OptionError(f"{source}: prediction_type = {value!r} is not auto, epsilon or v_prediction")
    if "train_text_encoder" in out:
        out["network_train_unet_only"] = not out.pop("train_text_encoder")
    if "save_last_n" in out:
        raise OptionError(f"{source}: save_last_n was replaced by kohya's --save_last_n_steps / --save_last_n_epochs")
    for old, new in (
        ("pretrained_model", "pretrained_model_name_or_path"),
        ("optimizer", "optimizer_type"),
        ("caption_extention", "caption_extension"),
    ):
        if old in out:
            out.setdefault(new, out.pop(old))
    return out


def _check_value(name: str, value, source: str):
    """A TOML value of the right type for field ``name`` (ints promote to floats; a scalar to a list)."""
    kind, is_list = _base_type(name)
    where = f"{source}: {name} = {value!r}"
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_check_scalar(kind, item, where) for item in items]
    return _check_scalar(kind, value, where)


def _check_scalar(kind: type, value, where: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # resolution = 512 in a kohya config
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OptionError(f"{where} should be {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise OptionError(f"{where} is not a finite number")
    return value


def read_config_file(path: str) -> dict:
    """kohya's ``read_config_from_file``: ``.toml`` is appended when missing; every table's keys are
    merged into one namespace. Unknown keys are errors here (kohya ignores them)."""
    if not path.endswith(".toml"):
        path += ".toml"
    if not os.path.isfile(path):
        raise OptionError(f"--config_file {path}: no such file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"--config_file {path}: not valid TOML ({e})") from None
    flat: dict = {}
    for key, value in data.items():
        for k, v in value.items() if isinstance(value, dict) else [(key, value)]:
            if k in flat:
                raise OptionError(f"{path}: {k} is set twice")
            flat[k] = v
    values = {}
    for key, value in flat.items():
        if key in ("config_file", "output_config"):
            raise OptionError(f"{path}: {key} cannot be set inside a config file")
        if key in REFUSED or (key not in FIELDS and key not in ALIASES):
            raise OptionError(f"{path}: {unknown_option_message(key, toml=True)}")
        values[key] = value
    values = _legacy(values, path)
    return {key: _check_value(key, value, path) for key, value in values.items()}


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line (and the ``--config_file`` TOML it names) into a TrainConfig.

    Raises OptionError naming the flag or file/key. Ranges and combinations are checked by
    :func:`tsm_trainer.training.validate.check_config`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    flags = [u for u in unknown if u.startswith("--")]
    if flags:
        raise OptionError(unknown_option_message(flags[0]))
    if unknown:
        raise OptionError(f"unexpected argument {unknown[0]!r} (options are --name value)")
    values = read_config_file(args.config_file) if args.config_file else {}
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config_file"}
    values.update(_legacy(given, "command line"))
    return TrainConfig(**values)
