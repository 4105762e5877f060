"""``train_tsm.py --task distill``: a k-step student distilled from the base model (the teacher)
with DMD2's objective (paper section 4.3, appendix A.3).

Three parties share the frozen base denoiser, each a different view of it:

* the teacher ("real" score): the base model with classifier-free guidance;
* the student: base + a TSM LoRA with one expert per student step (n = k; ``tsm_stage vanilla``
  gives the one-LoRA baseline), trained by distribution matching (+ GAN);
* the fake score: base + its own LoRA (zero-init, so it starts as the teacher) and a light
  discriminator head on its mid-block features, trained to denoise the student's samples (+ GAN).

Two time-scale update rule: ``distill_fake_updates`` fake-score updates per student update. Each
sample trains a student step drawn with ``distill_step_weights``, and the GAN terms switch on per
student step after a fraction of training; the defaults are appendix A.3's schedule (the experts at
999 / 749 / 499 / 249 get 25K / 25K / 25K / 45K steps, the first two mostly without the GAN, the
last two mostly with it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from tsm_trainer.core.intervals import expert_index
from tsm_trainer.core.metadata import kohya_metadata, modelspec_metadata
from tsm_trainer.core.network import TSMConfig, TSMNetwork
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.distill.dmd import (
    DiscriminatorHead,
    FeatureTap,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from tsm_trainer.training.distill.student import parse_student_timesteps, predict_x0, renoise, simulate_to
from tsm_trainer.training.objective import frozen_text_cache

# Appendix A.3, as the fraction of each expert's steps trained before the GAN term starts: 999 and 749
# get 20K without + 5K with; 499 5K + 20K; 249 5K + 40K; vanilla LoRA 40K + 5K.
PAPER_GAN_START_4 = (0.8, 0.8, 0.2, 0.11)
PAPER_GAN_START_VANILLA = 40 / 45
# ... and each TSM expert's share of the updates: 25K, 25K, 25K and 45K steps.
PAPER_STEP_WEIGHTS_4 = (25.0, 25.0, 25.0, 45.0)


def refuse_unused_dataset_keys(batches) -> None:
    """ValueError naming the file and key for what distillation would ignore: a dataset's
    ``network_multiplier`` (the student trains at 1.0) and ``is_reg`` subsets (no prior loss; they
    would serve as real images). ``batches``: one epoch of a TrainDataset (others are not checked)."""
    config = getattr(getattr(batches, "dataset", None), "config", None)
    for dataset in config.datasets if config is not None else ():
        if dataset.network_multiplier != 1.0:
            raise ValueError(
                f"{dataset.where}: key 'network_multiplier' = {dataset.network_multiplier} is not "
                "applied by --task distill (the student trains at 1.0); remove the key"
            )
        for subset in dataset.subsets:
            if subset.is_reg:
                raise ValueError(
                    f"{subset.where}: key 'is_reg' = true: --task distill has no prior loss, the "
                    "regularisation images would serve as real images; remove the subset"
                )


class DistillTrainer:
    """Student, fake score and discriminator on one base model; ``run()`` trains and saves the student."""

    def __init__(
        self,
        config: TrainConfig,
        family,
        components,
        make_batches: Callable[[int], Iterable[dict]],
        log: Callable[[str], None] = print,
    ):
        if not hasattr(components.noise_scheduler, "alphas_cumprod") or family.num_train_timesteps != 1000:
            raise ValueError("--task distill supports the DDPM families (sd1, sd2, sdxl)")
        self.config, self.family, self.c, self.log = config, family, components, log
        refuse_unused_dataset_keys(make_batches(0))
        self.make_batches = make_batches
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.T = family.num_train_timesteps
        self.timesteps = parse_student_timesteps(config.distill_timesteps, self.T)
        k = len(self.timesteps)
        torch.manual_seed(config.seed)
        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.requires_grad_(False).to(self.device)
        denoiser = components.denoiser
        vanilla = config.tsm_stage == "vanilla"
        if config.tsm_stage not in ("vanilla", "foster"):
            raise ValueError("--task distill trains a vanilla LoRA or fosters experts (--tsm_stage vanilla|foster)")
        n = 1 if vanilla else k
        self.student = TSMNetwork(
            TSMConfig(scales=[n], rank=config.network_dim, alpha=config.network_alpha, num_train_timesteps=self.T),
            denoiser,
            [],
        )
        if not vanilla:
            experts = [expert_index(t, n, self.T) for t in self.timesteps]
            if len(set(experts)) != k:
                raise ValueError(
                    f"--distill_timesteps {self.timesteps}: with n = {k} experts two student steps share "
                    f"an expert ({experts}); space them one per interval of T/{k}"
                )
        self.student.apply()
        self.student.attach(denoiser)
        self.fake = TSMNetwork(
            TSMConfig(
                scales=[1], rank=config.distill_fake_rank, alpha=config.distill_fake_rank, num_train_timesteps=self.T
            ),
            denoiser,
            [],
        )
        self.fake.apply()
        self.fake.attach(denoiser)
        self.tap = FeatureTap(denoiser.mid_block)
        self.head = DiscriminatorHead(denoiser.config.block_out_channels[-1])
        for module in (self.student, self.fake, self.head):
            module.to(self.device)
        if config.distill_gan_start:
            starts = [float(v) for v in config.distill_gan_start.split(",")]
            if len(starts) == 1:
                starts *= k
        elif vanilla:
            starts = [PAPER_GAN_START_VANILLA] * k
        else:
            starts = list(PAPER_GAN_START_4) if k == 4 else [0.5] * k
        if len(starts) != k or not all(0.0 <= s <= 1.0 for s in starts):
            raise ValueError(
                f"--distill_gan_start {config.distill_gan_start!r}: one fraction in [0, 1] per student "
                f"step ({k}), or one for all"
            )
        self.gan_start = torch.tensor(starts)
        if config.distill_step_weights:
            weights = [float(v) for v in config.distill_step_weights.split(",")]
        else:
            weights = list(PAPER_STEP_WEIGHTS_4) if k == 4 and not vanilla else [1.0] * k
        if len(weights) != k or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"--distill_step_weights {config.distill_step_weights!r}: one non-negative weight per "
                f"student step ({k})"
            )
        self.step_weights = torch.tensor(weights, dtype=torch.float64)
        gen_params = self.student.trainable_parameters()
        fake_params = self.fake.trainable_parameters() + list(self.head.parameters())
        self.gen_opt = torch.optim.AdamW(gen_params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.fake_opt = torch.optim.AdamW(
            fake_params, lr=config.distill_fake_lr or config.learning_rate, weight_decay=config.weight_decay
        )
        self.gen_params, self.fake_params = gen_params, fake_params
        self.step = 0
        self.text = frozen_text_cache(family, components, self.device)
        self.history: list[dict] = []

    # -- views of the base model ------------------------------------------------------------
    def use(self, party: str) -> None:
        """Switch the shared denoiser to the teacher, the student or the fake score."""
        self.student.set_multiplier(1.0 if party == "student" else 0.0)
        self.fake.set_multiplier(1.0 if party == "fake" else 0.0)

    def encode(self, captions: list[str]) -> dict:
        return self.text.encode(captions)

    def x0(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        out = self.family.predict(self.c, noisy, t, cond)
        return predict_x0(self.family.prediction_type, self.c.noise_scheduler, noisy, t, out)

    def teacher_x0(self, noisy, t, cond, uncond) -> torch.Tensor:
        """The real score with classifier-free guidance ``distill_real_guidance``."""
        g = self.config.distill_real_guidance
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        out_u, out_c = self.family.predict(self.c, torch.cat([noisy, noisy]), torch.cat([t, t]), both).chunk(2)
        out = out_u + g * (out_c - out_u)
        return predict_x0(self.family.prediction_type, self.c.noise_scheduler, noisy, t, out)

    # -- the losses -------------------------------------------------------------------------
    def student_sample(
        self, cond: dict, step_index: torch.Tensor, generator: torch.Generator, shape: tuple
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 with grad to the student, the student timestep of each sample)."""
        self.use("student")
        z = simulate_to(
            lambda z_, t_: self.x0(z_, t_, cond),
            self.c.noise_scheduler,
            self.timesteps,
            step_index,
            shape,
            generator,
            self.device,
        )
        t = torch.tensor(self.timesteps, device=self.device)[step_index.to(self.device)]
        return self.x0(z, t, cond), t

    def _noise_like(self, x, generator):
        return torch.randn(x.shape, generator=generator).to(self.device)

    def _draw_t(self, n, generator, lo=None, hi=None):
        lo = int(0.02 * self.T) if lo is None else lo
        hi = int(0.98 * self.T) if hi is None else hi
        return torch.randint(lo, hi, (n,), generator=generator).to(self.device)

    def generator_loss(
        self, x0: torch.Tensor, cond: dict, uncond: dict, gan_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """Distribution matching (+ GAN on the samples whose step is past its GAN start)."""
        t = self._draw_t(len(x0), generator)
        noisy = renoise(self.c.noise_scheduler, x0.detach(), self._noise_like(x0, generator), t)
        with torch.no_grad():
            self.use("teacher")
            real = self.teacher_x0(noisy, t, cond, uncond)
            self.use("fake")
            fake = self.x0(noisy, t, cond)
        loss = distribution_matching_loss(x0, real, fake)
        parts = {"dm": float(loss.detach())}
        if self.config.distill_gan_weight and bool(gan_mask.any()):
            self.use("fake")
            t_g = self._draw_t(len(x0), generator)
            noisy_g = renoise(self.c.noise_scheduler, x0, self._noise_like(x0, generator), t_g)
            self.family.predict(self.c, noisy_g, t_g, cond)
            logits = self.head(self.tap.features)[gan_mask.to(self.device)]
            gan = gan_generator_loss(logits)
            loss = loss + self.config.distill_gan_weight * gan
            parts["gan_g"] = float(gan.detach())
        return loss, parts

    def fake_loss(
        self, x0: torch.Tensor, cond: dict, real_latents: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """The fake score's denoising loss on student samples (+ the discriminator's loss)."""
        self.use("fake")
        t = torch.randint(0, self.T, (len(x0),), generator=generator).to(self.device)
        noisy, target = self.family.noisy_input_and_target(self.c, x0.detach(), self._noise_like(x0, generator), t)
        loss = F.mse_loss(self.family.predict(self.c, noisy, t, cond).float(), target.float())
        parts = {"fake": float(loss.detach())}
        if self.config.distill_gan_weight and real_latents is not None:
            t_d = self._draw_t(len(x0), generator)
            with torch.no_grad():
                noisy_fake = renoise(self.c.noise_scheduler, x0.detach(), self._noise_like(x0, generator), t_d)
                noisy_real = renoise(
                    self.c.noise_scheduler, real_latents, self._noise_like(real_latents, generator), t_d
                )
            self.family.predict(self.c, noisy_fake, t_d, cond)
            fake_logits = self.head(self.tap.features)
            self.family.predict(self.c, noisy_real, t_d, cond)
            real_logits = self.head(self.tap.features)
            d = gan_discriminator_loss(real_logits, fake_logits)
            loss = loss + self.config.distill_gan_weight * d
            parts["gan_d"] = float(d.detach())
        return loss, parts

    # -- one round: fake updates, then one student update -----------------------------------------
    def _generator_for(self, micro: int) -> torch.Generator:
        import numpy as np

        seed = np.random.SeedSequence([self.config.seed, self.step, micro])
        return torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0]))

    def _latents(self, batch: dict, generator) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device).float()
        with torch.no_grad():
            return self.family.encode_images(self.c, batch["pixels"].to(self.device), generator).float()

    def fake_backward(self, batch: dict, generator: torch.Generator) -> dict:
        """Gradients of the fake score's (and discriminator's) loss on a fresh student sample."""
        real = self._latents(batch, generator)
        cond = self.encode(batch["captions"])
        step_index = self.draw_steps(len(real), generator)
        with torch.no_grad():
            x0, _ = self.student_sample(cond, step_index, generator, tuple(real.shape))
        loss, parts = self.fake_loss(x0, cond, real, generator)
        self._check(loss, parts)
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        return parts

    def student_backward(
        self, batch: dict, generator: torch.Generator, progress: float, step_index: torch.Tensor | None = None
    ) -> dict:
        """Gradients of the student's loss (distribution matching, + GAN where due); the fake score and
        the discriminator are held fixed, so nothing but the student receives a gradient."""
        real = self._latents(batch, generator)
        cond, uncond = self.encode(batch["captions"]), self.encode([""] * len(real))
        if step_index is None:
            step_index = self.draw_steps(len(real), generator)
        for p in self.fake_params:
            p.requires_grad_(False)
        try:
            x0, _ = self.student_sample(cond, step_index, generator, tuple(real.shape))
            loss, parts = self.generator_loss(x0, cond, uncond, progress >= self.gan_start[step_index], generator)
            self._check(loss, parts)
            self.gen_opt.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            for p in self.fake_params:
                p.requires_grad_(True)
        return parts

    def draw_steps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) student step indices, drawn with ``step_weights``."""
        return torch.multinomial(self.step_weights, n, replacement=True, generator=generator)

    def _check(self, loss: torch.Tensor, parts: dict) -> None:
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite distillation loss at step {self.step + 1} ({parts}); lower --learning_rate")

    def train_round(self, batches) -> dict:
        """``distill_fake_updates`` fake-score updates, then one student update (a batch each)."""
        clip = self.config.max_grad_norm or float("inf")
        fake_parts: dict = {}
        for micro in range(self.config.distill_fake_updates):
            for key, value in self.fake_backward(next(batches), self._generator_for(micro)).items():
                fake_parts[key] = fake_parts.get(key, 0.0) + value / self.config.distill_fake_updates
            torch.nn.utils.clip_grad_norm_(self.fake_params, clip)
            self.fake_opt.step()
        progress = self.step / max(1, self.config.max_train_steps)
        parts = self.student_backward(next(batches), self._generator_for(self.config.distill_fake_updates), progress)
        torch.nn.utils.clip_grad_norm_(self.gen_params, clip)
        self.gen_opt.step()
        self.step += 1
        return parts | fake_parts

    def _batches(self):
        epoch = 0
        while True:
            yield from self.make_batches(epoch)
            epoch += 1

    def run(self) -> str:
        from tqdm.auto import tqdm

        config = self.config
        os.makedirs(config.output_dir, exist_ok=True)
        n = 1 if config.tsm_stage == "vanilla" else len(self.timesteps)
        self.log(
            f"distilling a {len(self.timesteps)}-step student at t = {self.timesteps}: "
            f"{'one LoRA' if n == 1 else f'{n} experts, one per step'}, {config.max_train_steps} student updates, "
            f"{config.distill_fake_updates} fake-score updates each; GAN from "
            f"{[round(float(s), 2) for s in self.gan_start]} of training per step, steps drawn with weights "
            f"{[round(float(w), 2) for w in self.step_weights / self.step_weights.sum()]}"
        )
        batches = self._batches()
        bar = tqdm(total=config.max_train_steps, desc="distill", dynamic_ncols=True)
        while self.step < config.max_train_steps:
            parts = self.train_round(batches)
            self.history.append(parts)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
        bar.close()
        self.use("student")
        return self.save(os.path.join(config.output_dir, f"{config.output_name}.safetensors"))

    def save(self, path: str) -> str:
        config = self.config
        family = self.student.family
        args = {"task": "distill", "tsm_stage": config.tsm_stage, "distill_timesteps": config.distill_timesteps}
        metadata = kohya_metadata(
            family, "networks.tsm_lora", config.network_dim, config.network_alpha, args, config.output_name
        )
        prediction = "v" if self.family.prediction_type == "v_prediction" else None
        metadata.update(modelspec_metadata(family, config.output_name, prediction_type=prediction))
        metadata.update(
            {
                "ss_steps": str(self.step),
                "tsm.trainer_stage": f"distill-{config.tsm_stage}",
                "tsm.student_timesteps": ",".join(str(t) for t in self.timesteps),
            }
        )
        self.student.save(path, metadata=metadata)
        self.log(f"saved {path}")
        return path
