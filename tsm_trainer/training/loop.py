"""The fixed training loop: one code path for every family and stage.

Per step: encode images and captions, draw noise and per-sample timesteps (from one seeded
generator, so resume is exact), predict, weight the loss (min-SNR), backward, clip, step.
Logs loss per timestep interval. Checkpoints are atomic; a non-finite loss stops training
with the last good checkpoint kept.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import torch

from ..intervals import expert_index, interval_timestep_range
from ..metadata import kohya_metadata, modelspec_metadata
from ..network import TSMConfig, TSMNetwork
from .checkpoint import load_state, prune_states, save_state
from .config import TrainConfig
from .objective import FrozenTextCache, denoising_loss, draw_timesteps, loss_by_interval

LOG_INTERVALS = 8  # per-interval losses are reported on 8 intervals whatever the scales


class NonFiniteLossError(RuntimeError):
    pass


def build_network(config: TrainConfig, components, num_train_timesteps: int) -> TSMNetwork:
    stage = "foster" if config.tsm_stage == "vanilla" else config.tsm_stage
    tsm = TSMConfig(scales=config.scales, stage=stage, mixture=config.tsm_mixture,
                    interval=None if config.tsm_interval < 0 else config.tsm_interval,
                    rank=config.network_dim, alpha=config.network_alpha,
                    dropout=config.network_dropout or None, num_train_timesteps=num_train_timesteps)
    encoders = components.text_encoders if config.train_text_encoder else []
    network = TSMNetwork(tsm, components.denoiser, encoders)
    if stage == "assemble":
        if not config.tsm_experts:
            raise ValueError("--tsm_stage assemble needs --tsm_experts (the fostered files, one per scale)")
        network.load_experts([p for p in config.tsm_experts.split(",") if p])
    network.apply()
    network.attach(components.denoiser)
    return network


def timestep_range(config: TrainConfig, step: int, T: int) -> tuple[int, int]:
    """[lo, hi) this step draws t from: all of [0, T); one interval of the core scale rotating
    with the step (stratified); or the ``tsm_interval`` being trained."""
    n = config.scales[0]
    if config.tsm_interval >= 0:
        return interval_timestep_range(config.tsm_interval, n, T)
    if config.timestep_sampling == "stratified":
        return interval_timestep_range(step % n, n, T)
    return 0, T


def sample_timesteps(config: TrainConfig, batch: int, step: int, generator: torch.Generator, T: int,
                     family=None) -> torch.Tensor:
    """(B,) timesteps in :func:`timestep_range`, with the family's density (uniform integers for
    DDPM families; flow families draw floats)."""
    lo, hi = timestep_range(config, step, T)
    return draw_timesteps(family, lo, hi, batch, generator)


def describe_budget(config: TrainConfig, batch_size: int, batches_per_epoch: int | None = None) -> str:
    """DESIGN.md section 7: what the step budget buys each expert, and whether that was enough on the
    demo world (README, Which to train: TSM beat vanilla LoRA at equal steps from ~10 epochs per expert)."""
    n = config.scales[0]
    samples = config.max_train_steps * batch_size * config.gradient_accumulation_steps
    if config.tsm_interval >= 0:
        return f"training expert {config.tsm_interval} of {n} alone: it sees all {samples} samples"
    if config.tsm_stage == "assemble":
        return f"assembling {config.scales}: experts frozen, routers see all {samples} samples"
    text = (f"{config.max_train_steps} steps x batch {batch_size * config.gradient_accumulation_steps}: "
            f"{samples} samples, about {samples / n:.0f} per expert (1/{n} each)")
    if batches_per_epoch and n > 1:
        epochs = config.max_train_steps * config.gradient_accumulation_steps / batches_per_epoch
        text += f", {epochs / n:.1f} epochs of the data per expert"
        if epochs / n < 10:
            fits = [k for k in (2, 4, 8, 16) if epochs / k >= 10]
            text += ("; on the demo world TSM beat vanilla LoRA at equal steps only from ~10 epochs per expert "
                     f"(README, Which to train): {f'--tsm_scales {fits[-1]}' if fits else '--tsm_stage vanilla'} "
                     "fits this budget")
    return text


def _optimizer(config: TrainConfig, groups):
    if config.optimizer == "adamw":
        # Fused: one kernel for the many small expert tensors (6x faster steps than the per-tensor loop
        # on CPU); devices without a fused kernel get the multi-tensor version.
        try:
            return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=True)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=config.learning_rate, weight_decay=config.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ValueError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
    return Prodigy(groups, lr=config.learning_rate if config.learning_rate != 1e-4 else 1.0,
                   weight_decay=config.weight_decay)


class Trainer:
    """Drives one training run. ``make_batches(epoch)`` yields {"pixels", "captions"} batches in a
    deterministic order for the epoch; ``validation`` is a fixed list of such batches."""

    def __init__(self, config: TrainConfig, family, components, make_batches: Callable[[int], Iterable[dict]],
                 batch_size: int, validation: list[dict] | None = None, log: Callable[[str], None] = print,
                 accelerator=None, batches_per_epoch: int | None = None):
        from accelerate import Accelerator

        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision,
                                                      cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.config, self.family, self.c = config, family, components
        self.make_batches, self.batch_size, self.batches_per_epoch = make_batches, batch_size, batches_per_epoch
        self.validation = validation or []
        self.log = log
        torch.manual_seed(config.seed)  # identical network init on every process
        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.requires_grad_(False)
            module.to(self.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        if config.xformers:
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise ValueError("--xformers: xformers is not installed (pip install xformers, CUDA only); "
                                 "without the flag PyTorch's SDPA attention is used")
            components.denoiser.enable_xformers_memory_efficient_attention()
        self._text_cache = None if config.train_text_encoder else FrozenTextCache(family, components, self.device)
        if config.gradient_checkpointing and hasattr(components.denoiser, "enable_gradient_checkpointing"):
            components.denoiser.enable_gradient_checkpointing()
            components.denoiser.train()
        self.T = family.num_train_timesteps
        self.network = build_network(config, components, self.T).to(self.device)
        torch.manual_seed(config.seed + self.accelerator.process_index)  # dropout differs per process
        lr_te = config.text_encoder_lr if config.text_encoder_lr >= 0 else config.learning_rate
        groups = [{"params": self.network.trainable_parameters(text_encoder=False), "lr": config.learning_rate}]
        te_params = self.network.trainable_parameters(denoiser=False)
        if te_params:
            groups.append({"params": te_params, "lr": lr_te})
        self.optimizer = _optimizer(config, groups)
        self.trainable = [p for group in groups for p in group["params"]]
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer, num_warmup_steps=config.lr_warmup_steps,
                                          num_training_steps=config.max_train_steps)
        self.step, self.epoch, self.position = 0, 0, 0
        self.interval_loss = torch.zeros(LOG_INTERVALS)
        self.interval_count = torch.zeros(LOG_INTERVALS)
        self.writer = None
        if config.logging_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.logging_dir)

    # -- one step -------------------------------------------------------------------------
    def _loss(self, batch: dict, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) losses; latent sampling and noise from ``generator`` (CPU, so runs and resumes are
        reproducible on any device)."""
        return denoising_loss(self.family, self.c, batch, timesteps, generator, self._encode_text, self.device,
                              self.config.noise_offset, self.accelerator.autocast)

    def _encode_text(self, captions: list[str]) -> dict:
        """Text conditioning; with a frozen text encoder each caption is encoded once and cached."""
        if self._text_cache is None:
            return self.family.encode_text(self.c, captions, self.device)
        return self._text_cache.encode(captions)

    def train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean loss."""
        if not self.network.training:  # validation and sampling switch to eval
            self.network.train()
        total = 0.0
        for micro, batch in enumerate(micro_batches):
            g = self._generator(micro)
            timesteps = sample_timesteps(self.config, len(batch["captions"]), self.step, g, self.T, self.family)
            per_sample = self._loss(batch, timesteps, g)
            weights = self.family.loss_weights(self.c, timesteps.to(self.device), self.config.min_snr_gamma)
            loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at step {self.step + 1} (t={timesteps.tolist()}); the last good "
                    f"checkpoint in {self.config.output_dir} is kept. Lower --learning_rate or use --mixed_precision bf16")
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
            idx = expert_index(timesteps, LOG_INTERVALS, self.T)
            self.interval_loss.index_add_(0, idx, per_sample.detach().float().cpu())
            self.interval_count.index_add_(0, idx, torch.ones(len(idx)))
        params = self.trainable
        if self.accelerator.num_processes > 1:
            sync_gradients(params, self.accelerator)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def _generator(self, micro: int) -> torch.Generator:
        """Noise and timesteps of (step, process, micro-batch) come from their own seed, so a
        resumed run draws exactly what the uninterrupted one did, on every process."""
        import numpy as np

        seed = np.random.SeedSequence([self.config.seed, self.step, self.accelerator.process_index, micro])
        return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0]))

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> list[float]:
        """Mean loss per interval on the held-out batches, with noise and timesteps fixed by a
        seed that doesn't depend on the run (identical for every method compared)."""
        self.network.eval()
        return loss_by_interval(self._loss, self.validation, self.family, self.T, LOG_INTERVALS)

    # -- the run ----------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict]:
        """This process's batches: every ``num_processes``-th of the epoch's global order."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        while True:
            for i, batch in enumerate(self.make_batches(self.epoch)):
                if i < self.position:
                    continue  # resumed inside an epoch
                self.position = i + 1
                if i % world == rank:
                    yield batch
            self.epoch += 1
            self.position = 0

    def save_state(self) -> str:
        folder = os.path.join(self.config.output_dir, f"state-{self.step}")
        save_state(folder, self.network, self.optimizer, self.lr_scheduler,
                   {"step": self.step, "epoch": self.epoch, "position": self.position})
        prune_states(self.config.output_dir, self.config.save_last_n)
        return folder

    def resume(self, folder: str) -> None:
        extra = load_state(folder, self.network, self.optimizer, self.lr_scheduler)
        self.step, self.epoch, self.position = extra["step"], extra["epoch"], extra["position"]
        self.log(f"resumed from {folder} at step {self.step}")

    def run(self) -> str:
        from tqdm.auto import tqdm

        config = self.config
        os.makedirs(config.output_dir, exist_ok=True)
        if config.resume:
            self.resume(config.resume)
        self.log(describe_budget(config, self.batch_size, self.batches_per_epoch))
        if config.sample_every_n_steps and not config.sample_prompts:
            raise ValueError("--sample_every_n_steps needs --sample_prompts (a text file, one prompt per line)")
        if config.save_every_n_epochs and not self.batches_per_epoch:
            raise ValueError("--save_every_n_epochs needs the number of batches per epoch")
        batches = self._batches()
        main = self.accelerator.is_main_process
        bar = tqdm(total=config.max_train_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not main)
        while self.step < config.max_train_steps:
            loss = self.train_step([next(batches) for _ in range(config.gradient_accumulation_steps)])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
            if self.writer is not None:
                self.writer.add_scalar("loss", loss, self.step)
                self.writer.add_scalar("lr", self.lr_scheduler.get_last_lr()[0], self.step)
            if main and config.save_every_n_steps and self.step % config.save_every_n_steps == 0:
                self.save_state()
            elif main and config.save_every_n_epochs and self.position >= self.batches_per_epoch \
                    and (self.epoch + 1) % config.save_every_n_epochs == 0:
                self.save_state()  # the epoch's last batch was just used
            if main and config.sample_every_n_steps and self.step % config.sample_every_n_steps == 0:
                self.log(f"samples: {self.write_samples()}")
            if self.validation and config.validate_every_n_steps and self.step % config.validate_every_n_steps == 0:
                self.log_validation()
        bar.close()
        if self.writer is not None:
            for i, (total, count) in enumerate(zip(self.interval_loss, self.interval_count)):
                if count:
                    self.writer.add_scalar(f"interval_loss/{i}", float(total / count), self.step)
            self.writer.flush()
        if self.validation:
            self.log_validation()
        path = os.path.join(config.output_dir, f"{config.output_name}.safetensors")
        if not main:
            return path
        family = self.network.family
        args = {k: str(getattr(config, k)) for k in ("tsm_stage", "tsm_scales", "tsm_mixture", "tsm_interval")}
        metadata = kohya_metadata(family, "networks.tsm_lora", config.network_dim, config.network_alpha, args,
                                  config.output_name)
        prediction = "v" if self.family.prediction_type == "v_prediction" else None
        metadata.update(modelspec_metadata(family, config.output_name, prediction_type=prediction))
        metadata.update({"ss_steps": str(self.step), "tsm.trainer_stage": config.tsm_stage})
        self.network.save(path, metadata=metadata)
        self.log(f"saved {path}")
        return path

    def write_samples(self) -> str:
        """A grid of the prompts file's images at this step: ``output_dir/samples/step-N.png``."""
        from PIL import Image

        with open(self.config.sample_prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ValueError(f"--sample_prompts {self.config.sample_prompts}: no prompt in the file")
        self.network.eval()
        images = self.family.sample(self.c, prompts, self.config.sample_steps, self.config.sample_guidance,
                                    self.config.sample_resolution, self.config.seed)
        size = self.config.sample_resolution
        grid = Image.new("RGB", (size * len(images), size))
        for i, image in enumerate(images):
            grid.paste(image, (i * size, 0))
        folder = os.path.join(self.config.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{self.step}.png")
        grid.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        return path

    def log_validation(self) -> list[float]:
        losses = self.validate()
        if self.writer is not None:
            for i, v in enumerate(losses):
                self.writer.add_scalar(f"val_interval_loss/{i}", v, self.step)
        self.log("validation loss per interval: " + " ".join(f"{v:.4f}" for v in losses))
        return losses



def sync_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """All-reduce (average) gradients across processes in one flat buffer, keeping
    ``grad is None`` for experts that no process used this step, so the optimizer leaves them
    untouched everywhere. An expert used elsewhere but not here contributes zeros here.
    """
    import torch.distributed as dist

    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    active = [p for p, flag in zip(params, used.tolist()) if flag]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not active:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in active])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= accelerator.num_processes
    offset = 0
    for p in active:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
