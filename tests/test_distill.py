"""train_tsm.py --task distill (DMD2 with one expert per student step) on a tiny SD model: where
each loss term's gradient goes, the student sampler, and the command line."""

import os

import pytest
import torch

from tests.tiny_models import tiny_sd_pipeline_folder, write_colour_squares
from tsm_trainer import TSMNetwork
from tsm_trainer.core.file_format import load_file
from tsm_trainer.training.build import build
from tsm_trainer.training.cli import main
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.distill import parse_student_timesteps
from tsm_trainer.training.distill.sampler import sample_student


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base = tiny_sd_pipeline_folder(str(root / "base"))
    return root, base, write_colour_squares(root, ["red", "green", "blue", "yellow"])


def _trainer(data, **overrides):
    root, base, toml = data
    config = TrainConfig(
        task="distill",
        pretrained_model_name_or_path=base,
        dataset_config=toml,
        output_dir=str(root / "out"),
        network_dim=2,
        distill_fake_rank=2,
        distill_fake_updates=1,
        max_train_steps=2,
        learning_rate=1e-3,
        distill_real_guidance=3.0,
        distill_gan_weight=0.5,
        seed=0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return build(config, log=lambda m: None)


def _batch(trainer):
    return next(iter(trainer.make_batches(0)))


def _expert_params(trainer, e):
    return [p for name, p in trainer.student.named_parameters() if f".tsm.4.{e}." in name]


def _reached(params):
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def _untouched(params):
    return all(p.grad is None for p in params)


def _clear(trainer):
    for module in (trainer.student, trainer.fake, trainer.head, trainer.c.denoiser):
        for p in module.parameters():
            p.grad = None


def test_distribution_matching_reaches_only_the_experts_of_the_steps_trained(data):
    trainer = _trainer(data, distill_gan_weight=0.0)
    _clear(trainer)
    g = torch.Generator().manual_seed(0)
    parts = trainer.student_backward(_batch(trainer), g, progress=0.0, step_index=torch.tensor([2, 2, 2, 2]))
    assert set(parts) == {"dm"} and parts["dm"] > 0
    assert _reached(_expert_params(trainer, 1))  # step 2 of [999, 749, 499, 249] is t = 499: expert [250, 500)
    for e in (0, 2, 3):  # the other student steps' experts: no gradient at all
        assert _untouched(_expert_params(trainer, e))
    assert _untouched(list(trainer.fake.parameters()) + list(trainer.head.parameters()))
    assert _untouched(list(trainer.c.denoiser.parameters()))


def test_gan_term_of_the_student_reaches_the_student_only(data):
    trainer = _trainer(data, distill_gan_start="0")
    grads = {}
    for weight in (0.0, 0.5):
        trainer.config.distill_gan_weight = weight
        _clear(trainer)
        parts = trainer.student_backward(
            _batch(trainer), torch.Generator().manual_seed(0), progress=0.0, step_index=torch.tensor([0, 1, 2, 3])
        )
        assert ("gan_g" in parts) == (weight > 0)
        grads[weight] = [p.grad.clone() for e in range(4) for p in _expert_params(trainer, e) if p.grad is not None]
        assert _untouched(list(trainer.fake.parameters()) + list(trainer.head.parameters()))
        assert all(p.requires_grad for p in trainer.fake_params)  # restored after the step
    assert any(not torch.equal(a, b) for a, b in zip(grads[0.0], grads[0.5]))  # the GAN term did reach it


def test_fake_score_and_discriminator_losses_reach_only_fake_and_head(data):
    trainer = _trainer(data)
    for weight in (0.0, 0.5):
        trainer.config.distill_gan_weight = weight
        _clear(trainer)
        parts = trainer.fake_backward(_batch(trainer), torch.Generator().manual_seed(1))
        assert parts["fake"] > 0 and ("gan_d" in parts) == (weight > 0)
        assert _reached(list(trainer.fake.parameters()))
        assert _reached(list(trainer.head.parameters())) == (weight > 0)
        if weight == 0:
            assert _untouched(list(trainer.head.parameters()))
        assert _untouched(list(trainer.student.parameters()))
        assert _untouched(list(trainer.c.denoiser.parameters()))


def test_student_timesteps_and_gan_schedule_are_checked(data):
    assert parse_student_timesteps("4") == [999, 749, 499, 249]
    assert parse_student_timesteps("2") == [999, 499]
    assert parse_student_timesteps("999, 500") == [999, 500]
    for bad in ("249,499", "1000,5", "x"):
        with pytest.raises(ValueError, match="distill_timesteps"):
            parse_student_timesteps(bad)
    with pytest.raises(ValueError, match="share an expert"):
        _trainer(data, distill_timesteps="999,900,499,249")
    with pytest.raises(ValueError, match="distill_gan_start"):
        _trainer(data, distill_gan_start="0.5,0.5")
    assert _trainer(data).gan_start.tolist() == pytest.approx([0.8, 0.8, 0.2, 0.11])
    with pytest.raises(ValueError, match="distill_step_weights"):
        _trainer(data, distill_step_weights="1,2")
    trainer = _trainer(data)  # appendix A.3: the step at t = 249 is trained 45/120 of the time
    drawn = trainer.draw_steps(12000, torch.Generator().manual_seed(0))
    assert torch.bincount(drawn, minlength=4).div(12000).tolist() == pytest.approx(
        [25 / 120] * 3 + [45 / 120], abs=0.015
    )
    vanilla = _trainer(data, tsm_stage="vanilla")
    assert vanilla.step_weights.tolist() == [1.0] * 4 and vanilla.gan_start.tolist() == pytest.approx([40 / 45] * 4)


def test_student_sampler_equals_diffusers_lcm_pipeline(data):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    trainer = _trainer(data)
    trainer.use("student")
    with torch.no_grad():
        for p in trainer.student.parameters():
            p.normal_(0, 0.2)
    c = trainer.c
    prompts = ["a red square", "a blue square"]
    ours = sample_student(trainer.family, c, prompts, [999, 749, 499, 249], 16, seed=3, latents_only=True)
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoders[0],
        tokenizer=c.tokenizers[0],
        unet=c.denoiser,
        scheduler=LCMScheduler.from_config(c.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(
            prompts,
            timesteps=[999, 749, 499, 249],
            guidance_scale=1.0,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
        ).images
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    images = sample_student(trainer.family, c, prompts, [999, 749, 499, 249], 16, seed=3)
    assert len(images) == 2 and images[0].size == (16, 16)


@pytest.mark.parametrize("stage", ["foster", "vanilla"])
def test_distill_from_the_command_line_saves_a_student_file(data, stage, capsys):
    root, base, toml = data
    out = str(root / f"cli-{stage}")
    assert (
        main(
            [
                "--task",
                "distill",
                "--pretrained_model",
                base,
                "--dataset_config",
                toml,
                "--output_dir",
                out,
                "--output_name",
                "student",
                "--tsm_stage",
                stage,
                "--network_dim",
                "2",
                "--distill_fake_rank",
                "2",
                "--distill_fake_updates",
                "2",
                "--max_train_steps",
                "2",
                "--distill_gan_start",
                "0.5",
            ]
        )
        == 0
    )
    assert "4-step student at t = [999, 749, 499, 249]" in capsys.readouterr().out
    path = os.path.join(out, "student.safetensors")
    tensors, meta = load_file(path)
    assert meta["tsm.student_timesteps"] == "999,749,499,249"
    assert meta["tsm.scales"] == ("[4]" if stage == "foster" else "[1]")
    from tsm_trainer.base_models.loading import load_components

    _, denoiser, _ = load_components(base)
    assert TSMNetwork.from_file(path, denoiser).denoiser_loras


def test_options_the_task_would_ignore_are_refused(data):
    root, base, toml = data
    common = ["--pretrained_model", base, "--dataset_config", toml, "--output_dir", str(root / "refused")]
    with pytest.raises(ValueError, match="--task distill does not support --mixed_precision, --resume"):
        build(
            TrainConfig(
                task="distill",
                pretrained_model_name_or_path=base,
                dataset_config=toml,
                resume="latest",
                mixed_precision="bf16",
            )
        )
    assert main(common + ["--distill_fake_updates", "2"]) == 2  # a distill option without --task distill
    assert not os.path.exists(root / "refused")


def test_dataset_keys_distillation_would_ignore_are_refused(data, tmp_path):
    root, base, toml = data
    text = open(toml).read()
    for edit, key in [
        (text.replace("batch_size =", "network_multiplier = 0.5\nbatch_size ="), "network_multiplier"),
        (text + text[text.index("  [[datasets.subsets]]") :] + "  is_reg = true\n", "is_reg"),
    ]:
        changed = tmp_path / f"{key}.toml"
        changed.write_text(edit)
        config = TrainConfig(
            task="distill",
            pretrained_model_name_or_path=base,
            dataset_config=str(changed),
            output_dir=str(tmp_path / "out"),
            network_dim=2,
            distill_fake_rank=2,
            max_train_steps=1,
        )
        with pytest.raises(ValueError, match=f"{changed}: .*key '{key}'.*--task distill"):
            build(config, log=lambda m: None)
