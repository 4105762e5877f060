"""Training options, declared once: every field is a ``--flag`` and a key of ``--config x.toml``.

The command line wins over the TOML file; both are validated strictly (an unknown key or a
value of the wrong type names the key, the file and what is expected).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field

try:
    import tomllib as _toml
except ImportError:  # Python 3.10
    import toml as _toml  # type: ignore


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model and data
    pretrained_model: str = _opt("", "base model: a local diffusers folder")
    family: str = _opt("auto", "model family", ("auto", "sd1", "sd2", "sdxl", "sd3", "flux", "pixart", "video"))
    prediction_type: str = _opt("auto", "epsilon or v_prediction (SD2-768 is v); auto reads the scheduler",
                                ("auto", "epsilon", "v_prediction"))
    dataset_config: str = _opt("", "kohya dataset config TOML")
    output_dir: str = _opt("output", "where checkpoints and the final file go")
    output_name: str = _opt("tsm", "file name stem of the saved network")
    task: str = _opt("train", "train: fine-tune (fostering / assembling); distill: a few-step student with one expert "
                     "per step (DMD2, paper section 4.3)", ("train", "distill"))
    # network and recipe
    tsm_recipe: str = _opt("none", "paper: foster 8, foster 1, assemble [8,1], each max_train_steps, into "
                           "output_dir/<output_name>-{foster8,foster1,assembled}; rerun to resume. 2.5x the steps of "
                           "one run; on the demo world it did not beat vanilla LoRA trained max_train_steps (README, "
                           "Which to train)", ("none", "paper"))
    tsm_stage: str = _opt("foster", "vanilla (n=1 LoRA), foster (experts) or assemble (routers)",
                          ("vanilla", "foster", "assemble"))
    tsm_scales: str = _opt("8", "scales: '8' to foster, '8,1' to assemble")
    tsm_experts: str = _opt("", "assemble: fostered files, comma-separated, one per scale")
    tsm_mixture: str = _opt("asymmetric", "assemble mixture", ("asymmetric", "symmetric"))
    tsm_interval: int = _opt(-1, "train only this expert of the scale (timesteps restricted to it); -1: all")
    timestep_sampling: str = _opt("uniform", "per-sample uniform t, or stratified (each batch from one interval, rotating)",
                                  ("uniform", "stratified"))
    network_dim: int = _opt(4, "LoRA rank")
    network_alpha: float = _opt(4.0, "LoRA alpha")
    network_dropout: float = _opt(0.0, "neuron dropout on the LoRA hidden")
    train_text_encoder: bool = _opt(False, "also train a shared text-encoder LoRA (fostering only)")
    # distillation (--task distill)
    distill_timesteps: str = _opt("4", "student timesteps, descending ('999,749,499,249'), or a step count (evenly "
                                  "spaced from T-1)")
    distill_fake_updates: int = _opt(5, "fake-score updates per student update (two time-scale update rule)")
    distill_fake_rank: int = _opt(16, "rank of the fake score model's LoRA")
    distill_fake_lr: float = _opt(0.0, "fake score / discriminator learning rate; 0: learning_rate")
    distill_real_guidance: float = _opt(1.75, "classifier-free guidance of the teacher (real) score (DMD2: 1.75)")
    distill_gan_weight: float = _opt(0.01, "weight of the GAN terms; 0: distribution matching only")
    distill_step_weights: str = _opt("", "how often each student step is trained, one weight per step; empty: the "
                                     "paper's for a 4-step TSM student (25,25,25,45), else uniform")
    distill_gan_start: str = _opt("", "fraction of training after which the GAN terms apply, one per student step "
                                  "or one for all; empty: the paper's (appendix A.3)")
    # optimisation
    max_train_steps: int = _opt(1000, "optimizer steps")
    learning_rate: float = _opt(1e-4, "learning rate")
    text_encoder_lr: float = _opt(-1.0, "text-encoder LoRA learning rate; -1: learning_rate")
    optimizer: str = _opt("adamw", "optimizer", ("adamw", "adamw8bit", "adafactor", "prodigy"))
    weight_decay: float = _opt(1e-2, "weight decay")
    lr_scheduler: str = _opt("constant", "LR schedule (diffusers.optimization names)",
                             ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = _opt(0, "warmup steps")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = _opt(1.0, "clip gradients to this norm; 0: off")
    mixed_precision: str = _opt("no", "autocast dtype", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward")
    min_snr_gamma: float = _opt(0.0, "min-SNR loss weighting gamma; 0: off")
    noise_offset: float = _opt(0.0, "noise offset")
    xformers: bool = _opt(False, "xformers attention (error when not installed); default SDPA")
    seed: int = _opt(42, "random seed")
    deterministic: bool = _opt(False, "torch deterministic algorithms")
    # saving, resuming, logging
    save_every_n_steps: int = _opt(0, "save a checkpoint every N steps; 0: only at the end")
    save_every_n_epochs: int = _opt(0, "also save a checkpoint at the end of every N epochs; 0: off")
    save_last_n: int = _opt(2, "keep the last K checkpoints")
    sample_every_n_steps: int = _opt(0, "write a grid of sample images every N steps; 0: off")
    sample_prompts: str = _opt("", "text file with one prompt per line, for the sample images")
    sample_steps: int = _opt(20, "sampler steps of the sample images")
    sample_guidance: float = _opt(5.0, "classifier-free guidance scale of the sample images")
    sample_resolution: int = _opt(512, "sample image size in pixels")
    resume: str = _opt("", "resume from a training-state folder (output_dir/state-STEP), or 'latest' (the newest "
                               "state in output_dir, if any)")
    validation_split: float = _opt(0.0, "held-out fraction for per-interval validation loss")
    validate_every_n_steps: int = _opt(0, "validation every N steps; 0: at the end only (when a split exists)")
    logging_dir: str = _opt("", "TensorBoard log folder; empty: off")
    skip_bad_files: bool = _opt(True, "skip unreadable images / missing captions (reported) instead of failing")
    cache_latents: bool = _opt(False, "encode every image once before training (needs random_crop off)")
    cache_dir: str = _opt("", "with cache_latents: keep the latents on disk here (safetensors) instead of memory")

    @property
    def scales(self) -> list[int]:
        from ..intervals import parse_scales

        return [1] if self.tsm_stage == "vanilla" else parse_scales(self.tsm_scales)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_tsm.py", description="Train TimeStep Master LoRA experts.")
    parser.add_argument("--config", help="TOML file with any of the options below (command line wins)")
    for name, f in FIELDS.items():
        kind = _field_type(f)
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(f"--{name}", type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)
    return parser


def _check_value(name: str, value, source: str):
    f = FIELDS[name]
    kind = _field_type(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {name} = {value!r} should be {kind.__name__}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{source}: {name} = {value!r} is not one of {list(choices)}")
    return value


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse the command line (and the ``--config`` TOML it names) into a TrainConfig."""
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config:
        if not os.path.isfile(args.config):
            raise ValueError(f"--config {args.config}: no such file")
        with open(args.config, "rb") as f:
            try:
                data = _toml.load(f)
            except Exception as e:  # tomllib and toml raise different types
                raise ValueError(f"{args.config}: not valid TOML ({e})") from None
        for key, value in data.items():
            if key not in FIELDS:
                raise ValueError(f"{args.config}: unknown key {key!r}; valid keys: {', '.join(FIELDS)}")
            values[key] = _check_value(key, value, args.config)
    for key in FIELDS:
        value = getattr(args, key)
        if value is not None:
            values[key] = _check_value(key, value, "command line")
    config = TrainConfig(**values)
    if not config.pretrained_model:
        raise ValueError("--pretrained_model is required (a local diffusers folder)")
    if not config.dataset_config:
        raise ValueError("--dataset_config is required (a kohya dataset TOML)")
    return config
