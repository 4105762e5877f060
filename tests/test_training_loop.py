"""The trainer's loop on a tiny SD pipeline: training works, resume is exact, bad states fail."""

import dataclasses

import pytest
import torch

from tsm_trainer.core.file_format import load_file
from tsm_trainer.families import get_training_family
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.loop import NonFiniteLossError, Trainer, sample_timesteps


def make_batches(epoch):
    g = torch.Generator().manual_seed(100 + epoch)
    for _ in range(3):  # 3 batches per epoch, so runs cross epochs
        yield {"pixels": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "captions": ["a red circle", "a blue square"]}


def _trainer(tiny_sd_base, tmp_path, **overrides):
    options = dict(
        pretrained_model_name_or_path=tiny_sd_base,
        dataset_config="unused",
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        max_train_steps=7,
        family="sd1",
    )
    config = TrainConfig(**{**options, **overrides})
    family = get_training_family("sd1")
    components = family.load(tiny_sd_base)
    validation = list(make_batches(99))[:1]
    return Trainer(
        config,
        family,
        components,
        make_batches,
        batch_size=2,
        validation=validation,
        log=lambda s: None,
        batches_per_epoch=3,
    )


def test_training_reduces_validation_loss_and_saves(tiny_sd_base, tmp_path):
    trainer = _trainer(
        tiny_sd_base,
        tmp_path,
        max_train_steps=25,
        tsm_scales="4",
        save_every_n_steps=10,
        save_last_n_steps=1,
        save_state=True,
    )
    before = trainer.validate()
    path = trainer.run()
    after = trainer.validate()
    assert sum(after) < sum(before)
    tensors, meta = load_file(path)
    assert meta["tsm.scales"] == "[4]" and meta["ss_steps"] == "25"
    # kohya's --save_last_n_steps 1: the step-10 save is removed at step 20; the end state is kept
    assert sorted(p.name for p in tmp_path.iterdir() if "state-" in p.name) == ["tsm-state-20", "tsm-state-25"]
    assert sorted(p.name for p in tmp_path.glob("*-step*")) == ["tsm-step00000020.safetensors"]


def test_resume_continues_exactly(tiny_sd_base, tmp_path):
    straight = _trainer(tiny_sd_base, tmp_path / "a", tsm_scales="8")
    straight.run()
    expected = straight.network.state_dict()

    first = _trainer(tiny_sd_base, tmp_path / "b", tsm_scales="8", max_train_steps=4, save_state=True)
    first.run()
    resumed = _trainer(tiny_sd_base, tmp_path / "b", tsm_scales="8", resume=str(tmp_path / "b" / "tsm-state-4"))
    resumed.run()
    assert resumed.step == 7
    for key, value in expected.items():
        assert torch.equal(resumed.network.state_dict()[key], value), key


def test_timestep_sampling_modes():
    g = torch.Generator().manual_seed(0)
    config = TrainConfig(tsm_scales="8", timestep_sampling="stratified")
    for step in range(16):
        t = sample_timesteps(config, 64, step, g, 1000)
        assert t.min() >= 125 * (step % 8) and t.max() < 125 * (step % 8 + 1)
    config = dataclasses.replace(config, tsm_interval=2, timestep_sampling="uniform")
    t = sample_timesteps(config, 1000, 0, g, 1000)
    assert t.min() >= 250 and t.max() < 375


def test_non_finite_loss_stops_with_a_clear_message(tiny_sd_base, tmp_path):
    trainer = _trainer(tiny_sd_base, tmp_path, tsm_scales="8")
    with torch.no_grad():
        for p in trainer.network.trainable_parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 1"):
        trainer.train_step([next(make_batches(0))])


def test_frozen_text_encoder_outputs_are_cached_and_equal(tiny_sd_base, tmp_path):
    trainer = _trainer(tiny_sd_base, tmp_path, tsm_scales="8", network_train_unet_only=True)
    cache, calls = trainer._text_cache, []
    encode = cache.encode_fn
    cache.encode_fn = lambda captions: calls.append(captions) or encode(captions)
    captions = ["a red circle", "a blue square", "a red circle"]
    cached = trainer._encode_text(captions)["encoder_hidden_states"]
    direct = trainer.family.encode_text(trainer.c, captions, trainer.device)["encoder_hidden_states"]
    torch.testing.assert_close(cached, direct)
    torch.testing.assert_close(trainer._encode_text(captions[:2])["encoder_hidden_states"], direct[:2])
    assert calls == [["a blue square", "a red circle"]]  # each distinct caption encoded once


def test_xformers_flag_without_xformers_is_a_clear_error(tiny_sd_base, tmp_path):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    with pytest.raises(ValueError, match="--xformers: xformers is not installed"):
        _trainer(tiny_sd_base, tmp_path, xformers=True)


def test_logging_dir_writes_tensorboard_scalars(tiny_sd_base, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(
        tiny_sd_base,
        tmp_path,
        tsm_scales="4",
        max_train_steps=3,
        logging_dir=str(tmp_path / "logs"),
        log_prefix="tsm4-",
    )
    trainer.run()
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.startswith("tsm4-")
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    tags = events.Tags()["scalars"]
    assert "lr" in tags and any(t.startswith("interval_loss/") for t in tags)


def test_logging_dir_without_tensorboard_is_a_clear_error(tiny_sd_base, tmp_path, monkeypatch):
    import importlib.util

    from tsm_trainer.training import validate

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        validate.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a),
    )
    config = TrainConfig(
        pretrained_model_name_or_path=tiny_sd_base,
        dataset_config="unused",
        output_dir=str(tmp_path),
        family="sd1",
        logging_dir=str(tmp_path / "logs"),
    )
    with pytest.raises(
        ValueError,
        match=r"^--logging_dir: TensorBoard logging needs the tensorboard package "
        r"\(pip install tensorboard",
    ):
        validate.check_config(config)


def test_sample_images_and_epoch_checkpoints(tiny_sd_base, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\na blue square\n")
    trainer = _trainer(
        tiny_sd_base,
        tmp_path,
        tsm_scales="8",
        max_train_steps=4,
        sample_every_n_steps=2,
        sample_prompts=str(prompts),
        sample_steps=2,
        sample_resolution=16,
        save_every_n_epochs=1,
        save_state=True,
    )
    trainer.run()
    from PIL import Image

    for step in (2, 4):
        with Image.open(tmp_path / "samples" / f"step-{step}.png") as grid:
            assert grid.size == (32, 16)  # two prompts side by side
    # 3 batches per epoch: epoch 1 ends after step 3
    assert (tmp_path / "tsm-state-3").is_dir()
    with pytest.raises(ValueError, match="--sample_every_n_steps needs --sample_prompts"):
        _trainer(tiny_sd_base, tmp_path / "b", sample_every_n_steps=1).run()


def test_prodigy_gets_the_given_learning_rate_and_a_warning_when_low(monkeypatch, caplog):
    from tsm_trainer.training import optimizers

    # prodigyopt is optional: a stand-in class shows what build_optimizer passes to it
    monkeypatch.setitem(optimizers.OPTIMIZERS, "prodigy", ("torch.optim", "SGD", {}, "prodigyopt"))
    params = [torch.nn.Parameter(torch.zeros(2))]
    with caplog.at_level("WARNING", logger=optimizers.__name__):
        low = optimizers.build_optimizer("Prodigy", params, 1e-4, {}, 0.0)
    assert low.param_groups[0]["lr"] == 1e-4
    assert "--learning_rate 0.0001 is low for Prodigy" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=optimizers.__name__):
        usual = optimizers.build_optimizer("prodigy", params, 1.0, {}, 0.0)
    assert usual.param_groups[0]["lr"] == 1.0 and not caplog.text


def test_dataset_network_multiplier_scales_the_network_for_its_batches(tiny_sd_base, tmp_path):
    batch = next(make_batches(0))
    options = dict(tsm_scales="2", optimizer_type="SGDNesterov", max_train_steps=1)
    scaled = _trainer(tiny_sd_base, tmp_path / "a", **options)
    seen = []
    loss = scaled._loss
    scaled._loss = lambda *args: seen.append(scaled.network.multiplier) or loss(*args)
    scaled.train_step([{**batch, "network_multiplier": 0.5}])
    assert seen == [0.5]
    assert {lora.multiplier for lora in scaled.network.all_loras} == {1.0}  # validation and saves see 1.0

    by_hand = _trainer(tiny_sd_base, tmp_path / "b", **options)
    by_hand.network.set_multiplier(0.5)
    by_hand.train_step([batch])
    plain = _trainer(tiny_sd_base, tmp_path / "c", **options)
    plain.train_step([{**batch, "network_multiplier": 1.0}])
    for key, value in scaled.network.state_dict().items():
        assert torch.equal(by_hand.network.state_dict()[key], value), key
    assert any(not torch.equal(plain.network.state_dict()[k], v) for k, v in scaled.network.state_dict().items())
