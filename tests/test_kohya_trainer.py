"""Trainer-level kohya semantics: 8-bit AdamW leaves unused experts bit-identical, a new learning
rate takes effect on resume, prior loss weight, timestep bounds, save pruning, sample prompts."""

import pytest
import torch

from tests.test_training_loop import _trainer, make_batches
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.loop import removal_step, timestep_range
from tsm_trainer.training.sample_prompts import read_sample_prompts


def test_adamw8bit_trains_only_the_experts_its_samples_used(tiny_sd_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = _trainer(
        tiny_sd_base,
        tmp_path,
        tsm_scales="4",
        tsm_interval=1,
        optimizer_type="AdamW8bit",
        network_train_unet_only=True,
        max_train_steps=3,
    )
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    batches = make_batches(0)
    for _ in range(3):
        trainer.train_step([next(batches)])
    after = trainer.network.state_dict()
    for key, value in before.items():
        if ".tsm.4." in key and ".tsm.4.1." not in key:
            assert torch.equal(after[key], value), key  # experts 0, 2, 3: never used, bit-identical
    assert any(not torch.equal(after[k], v) for k, v in before.items() if ".tsm.4.1.lora_up" in k)


def test_a_new_learning_rate_takes_effect_on_resume(tiny_sd_base, tmp_path):
    first = _trainer(
        tiny_sd_base,
        tmp_path,
        tsm_scales="4",
        max_train_steps=2,
        save_state=True,
        learning_rate=1e-2,
        lr_scheduler="linear",
    )
    first.run()
    logs = []
    resumed = _trainer(
        tiny_sd_base,
        tmp_path,
        tsm_scales="4",
        max_train_steps=4,
        learning_rate=1e-3,
        lr_scheduler="linear",
        resume=str(tmp_path / "tsm-state-2"),
    )
    resumed.log = logs.append
    resumed.resume(str(tmp_path / "tsm-state-2"))
    assert any("--learning_rate changed from 0.01 to 0.001" in line for line in logs)
    # linear decay over 4 steps, at step 2 of 4: half of the new rate (the saved 1e-2 is gone)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    resumed.train_step([next(make_batches(0))])
    assert resumed.lr_scheduler.get_last_lr()[0] == pytest.approx(2.5e-4)


def test_prior_loss_weight_scales_regularization_samples(tiny_sd_base, tmp_path):
    batch = {**next(make_batches(0)), "is_reg": torch.tensor([True, True])}
    zero = _trainer(tiny_sd_base, tmp_path, tsm_scales="4", prior_loss_weight=0.0)
    assert zero.train_step([batch]) == 0.0
    half = _trainer(tiny_sd_base, tmp_path / "b", tsm_scales="4", prior_loss_weight=0.5)
    full = _trainer(tiny_sd_base, tmp_path / "c", tsm_scales="4")
    assert half.train_step([batch]) == pytest.approx(0.5 * full.train_step([batch]), rel=1e-5)


def test_timestep_bounds_and_tsm_intervals_intersect():
    config = TrainConfig(tsm_scales="4", min_timestep=100, max_timestep=600)
    assert timestep_range(config, 0, 1000) == (100, 600)
    assert timestep_range(config, 0, 1000, tsm=False) == (100, 600)
    config = TrainConfig(tsm_scales="4", tsm_interval=0, min_timestep=100, max_timestep=600)
    assert timestep_range(config, 0, 1000) == (100, 250)
    config = TrainConfig(tsm_scales="4", tsm_interval=3, max_timestep=600)
    with pytest.raises(ValueError, match="do not overlap"):
        timestep_range(config, 0, 1000)


def test_save_last_n_steps_removes_what_kohya_removes():
    # every 10 steps, keep the last 25: at step 40 the step-10 save goes (kohya's get_remove_step_no)
    assert [removal_step(s, 25, 10) for s in (10, 20, 30, 40, 50)] == [None, None, None, 10, 20]
    assert removal_step(40, None, 10) is None


def test_kohya_sample_prompt_syntax(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na red square --w 32 --h 32 --d 7 --l 6.5 --s 3\na cat\n")
    first, second = read_sample_prompts(str(path))
    assert (first.prompt, first.size, first.seed, first.guidance, first.steps) == ("a red square", 32, 7, 6.5, 3)
    assert (second.prompt, second.size, second.seed) == ("a cat", None, None)
    path.write_text("a cat --w 32 --h 64\n")
    with pytest.raises(ValueError, match="line 1: --w 32 --h 64: only square samples"):
        read_sample_prompts(str(path))
    path.write_text("a cat --q 3\n")
    with pytest.raises(ValueError, match="line 1: unknown option --q"):
        read_sample_prompts(str(path))
