"""The fixed training loop: one code path for every family, stage and network module.

Per step: encode images and captions, draw noise and per-sample timesteps (from one seeded
generator, so resume is exact), predict, weight the loss (min-SNR, prior loss weight), backward,
clip, step, max-norm. The network comes from ``--network_module`` (network_plugin.py); the TSM
parts (expert budget, stratified or one-interval timesteps, loss per interval) apply to TSM
networks. Saves follow sd-scripts (OUTPUT_NAME-stepNNNNNNNN / -NNNNNN files, --save_state
folders, --save_last_n_steps/epochs); files are written atomically.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from tsm_trainer.core.atomic_write import atomic_file
from tsm_trainer.core.intervals import expert_index, interval_timestep_range
from tsm_trainer.core.metadata import kohya_metadata, modelspec_metadata
from tsm_trainer.core.network import TSMNetwork
from tsm_trainer.data.dataset import indexed_batches
from tsm_trainer.training.checkpoint import kept_checkpoint_note, load_state, save_state, state_folder
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.network_plugin import build_network
from tsm_trainer.training.objective import denoising_loss, draw_timesteps, frozen_text_cache, loss_by_interval
from tsm_trainer.training.optimizers import build_optimizer, parse_optimizer_args
from tsm_trainer.training.output_dir import check_final_file
from tsm_trainer.training.run_record import run_record

SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

LOG_INTERVALS = 8  # per-interval losses are reported on 8 intervals whatever the scales


class NonFiniteLossError(RuntimeError):
    pass


def timestep_range(config: TrainConfig, step: int, T: int, tsm: bool = True) -> tuple[int, int]:
    """[lo, hi) this step draws t from: [--min_timestep, --max_timestep) (default [0, T)), within
    one interval of the core scale rotating with the step (stratified) or the ``tsm_interval`` being
    trained (TSM networks)."""
    lo, hi = config.min_timestep or 0, T if config.max_timestep is None else min(config.max_timestep, T)
    if not tsm:
        return lo, hi
    n = config.scales[0]
    if config.tsm_interval >= 0:
        a, b = interval_timestep_range(config.tsm_interval, n, T)
    elif config.timestep_sampling == "stratified":
        a, b = interval_timestep_range(step % n, n, T)
    else:
        return lo, hi
    if max(a, lo) >= min(b, hi):
        raise ValueError(
            f"--min_timestep/--max_timestep [{lo}, {hi}) and the expert's interval [{a}, {b}) do not overlap"
        )
    return max(a, lo), min(b, hi)


def sample_timesteps(
    config: TrainConfig, batch: int, step: int, generator: torch.Generator, T: int, family=None, tsm: bool = True
) -> torch.Tensor:
    """(B,) timesteps in :func:`timestep_range`, with the family's density (uniform integers for
    DDPM families; flow families draw floats)."""
    lo, hi = timestep_range(config, step, T, tsm)
    return draw_timesteps(family, lo, hi, batch, generator)


def describe_budget(config: TrainConfig, batch_size: int, batches_per_epoch: int | None = None) -> str:
    """docs/design.md section 7: what the step budget buys each expert, and whether that was enough on the
    demo world (README, Which to train: TSM beat vanilla LoRA at equal steps from ~10 epochs per expert)."""
    n = config.scales[0]
    samples = config.max_train_steps * batch_size * config.gradient_accumulation_steps
    if config.tsm_interval >= 0:
        return f"training expert {config.tsm_interval} of {n} alone: it sees all {samples} samples"
    if config.tsm_stage == "assemble":
        return f"assembling {config.scales}: experts frozen, routers see all {samples} samples"
    text = (
        f"{config.max_train_steps} steps x batch {batch_size * config.gradient_accumulation_steps}: "
        f"{samples} samples, about {samples / n:.0f} per expert (1/{n} each)"
    )
    if batches_per_epoch and n > 1:
        epochs = config.max_train_steps * config.gradient_accumulation_steps / batches_per_epoch
        text += f", {epochs / n:.1f} epochs of the data per expert"
        if epochs / n < 10:
            fits = [k for k in (2, 4, 8, 16) if epochs / k >= 10]
            text += (
                "; on the demo world TSM beat vanilla LoRA at equal steps only from ~10 epochs per expert "
                f"(README, Which to train): {f'--tsm_scales {fits[-1]}' if fits else '--tsm_stage vanilla'} "
                "fits this budget"
            )
    return text


def removal_step(step: int, last_n: int | None, every: int | None) -> int | None:
    """sd-scripts' get_remove_step_no: the step save that falls out of the last ``last_n`` steps."""
    if not last_n or not every:
        return None
    old = step - last_n - 1
    old -= old % every
    return old if old > 0 else None


class _SavedNetwork:
    """``save`` / ``load_weights`` for checkpoint.py, over a kohya module's save_weights / load_weights."""

    def __init__(self, network):
        self.network = network

    def save(self, path: str, dtype=None, metadata=None) -> None:
        self.network.save_weights(path, dtype, metadata or {})

    def load_weights(self, path: str):
        return self.network.load_weights(path)


class Trainer:
    """Drives one training run. ``make_batches(epoch)`` yields {"pixels", "captions"} batches in a
    deterministic order for the epoch; ``validation`` is a fixed list of such batches."""

    def __init__(
        self,
        config: TrainConfig,
        family,
        components,
        make_batches: Callable[[int], Iterable[dict]],
        batch_size: int,
        validation: list[dict] | None = None,
        log: Callable[[str], None] = print,
        accelerator=None,
        batches_per_epoch: int | None = None,
        resolution: tuple[int, int] | None = None,
    ):
        from accelerate import Accelerator

        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.device = self.accelerator.device
        self.config, self.family, self.c = config, family, components
        self.make_batches, self.batch_size, self.batches_per_epoch = make_batches, batch_size, batches_per_epoch
        self.validation = validation or []
        self.log = log
        self.resolution = resolution  # the dataset's (width, height), written as modelspec.resolution
        torch.manual_seed(config.seed)  # identical network init on every process
        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.requires_grad_(False)
            module.to(self.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        if config.xformers:
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise ValueError(
                    "--xformers: xformers is not installed (pip install xformers, CUDA only); "
                    "without the flag PyTorch's SDPA attention is used"
                )
            components.denoiser.enable_xformers_memory_efficient_attention()
        if config.gradient_checkpointing and hasattr(components.denoiser, "enable_gradient_checkpointing"):
            components.denoiser.enable_gradient_checkpointing()
            components.denoiser.train()
        self.T = family.num_train_timesteps
        built = build_network(config, components, log)
        self.network = built.network.to(self.device)
        self.network_args = built.network_args
        self.is_tsm = isinstance(self.network, TSMNetwork)
        self._text_cache = None if built.train_text_encoder else frozen_text_cache(family, components, self.device)
        torch.manual_seed(config.seed + self.accelerator.process_index)  # dropout differs per process
        groups = built.param_groups
        self.optimizer = build_optimizer(
            config.optimizer_type,
            groups,
            config.learning_rate,
            parse_optimizer_args(config.optimizer_args),
            config.weight_decay,
        )
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        from diffusers.optimization import get_scheduler

        extra = {}
        if config.lr_scheduler_num_cycles is not None:
            extra["num_cycles"] = config.lr_scheduler_num_cycles
        if config.lr_scheduler_power is not None:
            extra["power"] = config.lr_scheduler_power
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
            **extra,
        )
        self.step, self.epoch, self.position = 0, 0, 0
        self.data_identity: dict = {}  # run_record.data_identity of the dataset, saved in states and checked on resume
        self.interval_loss = torch.zeros(LOG_INTERVALS)
        self.interval_count = torch.zeros(LOG_INTERVALS)
        self.writer = None
        if config.logging_dir and self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            run = (config.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
            self.writer = SummaryWriter(os.path.join(config.logging_dir, run))

    # -- one step -------------------------------------------------------------------------
    def _loss(self, batch: dict, timesteps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) losses; latent sampling and noise from ``generator`` (CPU, so runs and resumes are
        reproducible on any device)."""
        return denoising_loss(
            self.family,
            self.c,
            batch,
            timesteps,
            generator,
            self._encode_text,
            self.device,
            self.config.noise_offset or 0.0,
            self.accelerator.autocast,
        )

    def _encode_text(self, captions: list[str]) -> dict:
        """Text conditioning; with a frozen text encoder each caption is encoded once and cached."""
        if self._text_cache is None:
            return self.family.encode_text(self.c, captions, self.device)
        return self._text_cache.encode(captions)

    def train_step(self, micro_batches: list[dict]) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean loss."""
        if not self.network.training:  # validation and sampling switch to eval
            self.network.train()
        if hasattr(self.network, "on_step_start"):
            self.network.on_step_start(self.c.text_encoders, self.c.denoiser)
        total = 0.0
        for micro, batch in enumerate(micro_batches):
            g = self._generator(micro)
            timesteps = sample_timesteps(
                self.config, len(batch["captions"]), self.step, g, self.T, self.family, self.is_tsm
            )
            with self._dataset_multiplier(batch):
                per_sample = self._loss(batch, timesteps, g)
            weights = self.family.loss_weights(self.c, timesteps.to(self.device), self.config.min_snr_gamma or 0.0)
            weighted = per_sample * weights if weights is not None else per_sample
            if "is_reg" in batch and self.config.prior_loss_weight != 1.0:
                is_reg = torch.as_tensor(batch["is_reg"], device=weighted.device)
                weighted = weighted * torch.where(is_reg, self.config.prior_loss_weight, 1.0)
            loss = weighted.mean()
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss {loss.item()} at step {self.step + 1} (t={timesteps.tolist()}); "
                    f"{kept_checkpoint_note(self.config.output_dir, self.config.output_name)}. "
                    "Lower --learning_rate or use --mixed_precision bf16"
                )
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
            if self.is_tsm:
                idx = expert_index(timesteps, LOG_INTERVALS, self.T)
                self.interval_loss.index_add_(0, idx, per_sample.detach().float().cpu())
                self.interval_count.index_add_(0, idx, torch.ones(len(idx)))
        params = self.trainable
        if self.accelerator.num_processes > 1:
            sync_gradients(params, self.accelerator)
        if self.config.max_grad_norm:
            clip = self.network.get_trainable_params() if hasattr(self.network, "get_trainable_params") else params
            torch.nn.utils.clip_grad_norm_(list(clip), self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.scale_weight_norms:
            self.keys_scaled, _, _ = self.network.apply_max_norm_regularization(
                self.config.scale_weight_norms, self.device
            )
        self.step += 1
        return total

    @contextmanager
    def _dataset_multiplier(self, batch: dict):
        """The batch's dataset ``network_multiplier`` applied to the network for its forward pass, as
        sd-scripts' train_network.py sets it per batch; 1.0 again afterwards (validation, sampling, saves)."""
        multiplier = float(batch.get("network_multiplier", 1.0))
        if multiplier == 1.0:
            yield
            return
        if not hasattr(self.network, "set_multiplier"):
            raise ValueError(
                f"dataset config key 'network_multiplier' = {multiplier}: --network_module "
                f"{self.config.network_module} has no set_multiplier; remove the key or use a network "
                "module that has one"
            )
        self.network.set_multiplier(multiplier)
        try:
            yield
        finally:
            self.network.set_multiplier(1.0)

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
            if hasattr(self.network, "on_epoch_start"):
                self.network.on_epoch_start(self.c.text_encoders, self.c.denoiser)
            for i, batch in indexed_batches(self.make_batches(self.epoch), self.position, lambda i: i % world == rank):
                self.position = i + 1  # resumed inside an epoch: the batches before are skipped unloaded
                yield batch
            self.epoch += 1
            self.position = 0

    def _state_network(self):
        return self.network if self.is_tsm else _SavedNetwork(self.network)

    def state_folder(self, step: int) -> str:
        """The training-state folder of ``step`` (named by checkpoint.state_folder)."""
        return state_folder(self.config.output_dir, self.config.output_name, step)

    def save_state(self, folder: str | None = None) -> str:
        folder = folder or self.state_folder(self.step)
        save_state(
            folder,
            self._state_network(),
            self.optimizer,
            self.lr_scheduler,
            {
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "run": run_record(self.config, self.data_identity),
            },
        )
        return folder

    def resume(self, folder: str) -> None:
        extra = load_state(
            folder,
            self._state_network(),
            self.optimizer,
            self.lr_scheduler,
            run_record(self.config, self.data_identity),
            self.log,
        )
        self.step, self.epoch, self.position = extra["step"], extra["epoch"], extra["position"]
        self.log(f"resumed from {folder} at step {self.step}")

    def _metadata(self) -> dict[str, str]:
        """sd-scripts' training metadata (ss_*) and, for TSM files, the trainer stage."""
        config = self.config
        lr_te = config.text_encoder_lr
        meta = {
            "ss_steps": str(self.step),
            "ss_epoch": str(self.epoch + 1),
            "ss_learning_rate": str(config.learning_rate),
            "ss_unet_lr": str(config.unet_lr),
            "ss_text_encoder_lr": str(lr_te[0] if lr_te else lr_te),
            "ss_optimizer": config.optimizer_type,
            "ss_lr_scheduler": config.lr_scheduler,
            "ss_lr_warmup_steps": str(config.lr_warmup_steps),
            "ss_seed": str(config.seed),
            "ss_mixed_precision": config.mixed_precision,
            "ss_max_train_steps": str(config.max_train_steps),
            "ss_network_dropout": str(config.network_dropout),
            "ss_min_snr_gamma": str(config.min_snr_gamma),
            "ss_noise_offset": str(config.noise_offset),
        }
        if config.training_comment:
            meta["ss_training_comment"] = config.training_comment
        prediction = "v" if self.family.prediction_type == "v_prediction" else None
        if self.is_tsm:
            family = self.network.family
            meta["tsm.trainer_stage"] = config.tsm_stage
        else:
            from tsm_trainer.families import detect_family

            family = detect_family(self.c.denoiser)
            dim = getattr(self.network, "lora_dim", config.network_dim)
            meta.update(
                kohya_metadata(
                    family, config.network_module, dim, config.network_alpha, self.network_args, config.output_name
                )
            )
        meta.update(
            modelspec_metadata(family, config.output_name, prediction_type=prediction, resolution=self.resolution)
        )
        return meta

    def save_network(self, name: str) -> str:
        """Write ``output_dir/name.safetensors`` through the module's save_weights (atomic for TSM)."""
        path = os.path.join(self.config.output_dir, f"{name}.safetensors")
        meta = self._metadata()
        meta["modelspec.title"] = name
        self.network.save_weights(path, SAVE_DTYPES[self.config.save_precision], meta)
        return path

    def _save_and_prune(self, name: str, state: str, removed_name: str | None, removed_state: str | None) -> None:
        self.save_network(name)
        if self.config.save_state:
            self.save_state(state)
        for path in (
            removed_name and os.path.join(self.config.output_dir, f"{removed_name}.safetensors"),
            removed_state,
        ):
            if path and os.path.isfile(path):
                os.remove(path)
            elif path and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    def _save_step(self) -> None:
        c = self.config
        old = removal_step(self.step, c.save_last_n_steps, c.save_every_n_steps)
        self._save_and_prune(
            f"{c.output_name}-step{self.step:08d}",
            self.state_folder(self.step),
            None if old is None else f"{c.output_name}-step{old:08d}",
            None if old is None else self.state_folder(old),
        )

    def _save_epoch(self, epoch: int) -> None:
        """sd-scripts: OUTPUT_NAME-NNNNNN (1-based epoch); save_last_n_epochs keeps that many epoch saves."""
        c = self.config
        old = epoch - c.save_every_n_epochs * c.save_last_n_epochs if c.save_last_n_epochs else 0
        old_state = None
        if old > 0:
            old_state = self._epoch_states.pop(old, None)
        self._epoch_states[epoch] = self.state_folder(self.step)
        self._save_and_prune(
            f"{c.output_name}-{epoch:06d}",
            self._epoch_states[epoch],
            f"{c.output_name}-{old:06d}" if old > 0 else None,
            old_state,
        )

    def run(self) -> str:
        from tqdm.auto import tqdm

        config = self.config
        os.makedirs(config.output_dir, exist_ok=True)
        if config.resume:
            self.resume(config.resume)
        if self.is_tsm:
            self.log(describe_budget(config, self.batch_size, self.batches_per_epoch))
        if (config.sample_every_n_steps or config.sample_every_n_epochs) and not config.sample_prompts:
            raise ValueError("--sample_every_n_steps needs --sample_prompts (a text file, one prompt per line)")
        if config.save_every_n_epochs and not self.batches_per_epoch:
            raise ValueError("--save_every_n_epochs needs the number of batches per epoch")
        self._epoch_states: dict[int, str] = {}
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
            epoch_end = bool(self.batches_per_epoch) and self.position >= self.batches_per_epoch  # last batch used
            last = self.step >= config.max_train_steps
            if main and config.save_every_n_steps and self.step % config.save_every_n_steps == 0 and not last:
                self._save_step()
            every_epochs = config.save_every_n_epochs
            if main and epoch_end and every_epochs and (self.epoch + 1) % every_epochs == 0 and not last:
                self._save_epoch(self.epoch + 1)
            sample = (config.sample_every_n_steps and self.step % config.sample_every_n_steps == 0) or (
                epoch_end and config.sample_every_n_epochs and (self.epoch + 1) % config.sample_every_n_epochs == 0
            )
            if main and sample:
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
        check_final_file(path, self.step, config.overwrite)
        if config.save_state:
            self.save_state()
        path = self.save_network(config.output_name)
        self.log(f"saved {path}")
        return path

    def write_samples(self) -> str:
        """A grid of the prompts file's images at this step: ``output_dir/samples/step-N.png``."""
        from PIL import Image

        from tsm_trainer.training.sample_prompts import read_sample_prompts

        config = self.config
        self.network.eval()
        images = []
        for p in read_sample_prompts(config.sample_prompts):
            images += self.family.sample(
                self.c,
                [p.prompt],
                p.steps or config.sample_steps,
                config.sample_guidance if p.guidance is None else p.guidance,
                p.size or config.sample_resolution,
                config.seed if p.seed is None else p.seed,
            )
        height = max(image.height for image in images)
        grid = Image.new("RGB", (sum(image.width for image in images), height))
        x = 0
        for image in images:
            grid.paste(image, (x, 0))
            x += image.width
        folder = os.path.join(config.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{self.step}.png")
        with atomic_file(path, suffix=".png") as tmp:
            grid.save(tmp)
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
