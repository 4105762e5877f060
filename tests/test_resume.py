"""Resume and run safety through the trainer and the command line, on a tiny SD pipeline."""

import os
from collections.abc import Sequence

import pytest
import torch
from PIL import Image

from tsm_trainer.core.file_format import load_file
from tsm_trainer.families import get_training_family
from tsm_trainer.training.checkpoint import list_states
from tsm_trainer.training.cli import main
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.loop import NonFiniteLossError, Trainer


class CountingBatches(Sequence):
    """3 batches per epoch, loaded (and counted) only when indexed, like TrainDataset.epoch_batches."""

    def __init__(self, epoch, loads):
        self.epoch, self.loads = epoch, loads

    def __len__(self):
        return 3

    def __getitem__(self, i):
        if not 0 <= i < 3:
            raise IndexError(i)
        self.loads.append((self.epoch, i))
        g = torch.Generator().manual_seed(100 + 10 * self.epoch + i)
        return {"pixels": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "captions": ["a red circle", "a square"]}


def _trainer(tiny_sd_base, out, loads=None, log=None, **overrides):
    loads = [] if loads is None else loads
    options = dict(
        pretrained_model_name_or_path=tiny_sd_base,
        dataset_config="unused",
        output_dir=str(out),
        learning_rate=1e-2,
        max_train_steps=7,
        family="sd1",
        tsm_scales="8",
    )
    config = TrainConfig(**{**options, **overrides})
    family = get_training_family("sd1")
    trainer = Trainer(
        config,
        family,
        family.load(tiny_sd_base),
        lambda e: CountingBatches(e, loads),
        batch_size=2,
        log=log or (lambda s: None),
        batches_per_epoch=3,
    )
    trainer.data_identity = {"dataset_fingerprint": "fp", "dataset_config_sha256": "cfg"}
    return trainer


def test_mid_epoch_resume_loads_no_skipped_batch_and_is_exact(tiny_sd_base, tmp_path):
    straight = _trainer(tiny_sd_base, tmp_path / "a")
    straight.run()
    first = _trainer(tiny_sd_base, tmp_path / "b", max_train_steps=4, save_every_n_steps=4, save_state=True)
    first.run()  # 3 batches per epoch: the state is at epoch 1, position 1
    loads = []
    resumed = _trainer(tiny_sd_base, tmp_path / "b", loads, resume=str(tmp_path / "b" / "tsm-state-4"))
    resumed.run()
    assert loads == [(1, 1), (1, 2), (2, 0)]  # batch (1, 0) was used before the state: not loaded again
    for key, value in straight.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[key], value), key


def test_resume_refuses_a_changed_seed_or_dataset_and_applies_a_new_learning_rate(tiny_sd_base, tmp_path):
    _trainer(tiny_sd_base, tmp_path, max_train_steps=2, save_every_n_steps=2, save_state=True).run()
    state = str(tmp_path / "tsm-state-2")
    with pytest.raises(ValueError, match=r"tsm-state-2/state.json: --seed was 42 when this state was saved, now 7"):
        _trainer(tiny_sd_base, tmp_path, resume=state, seed=7).run()
    changed = _trainer(tiny_sd_base, tmp_path, resume=state)
    changed.data_identity = {"dataset_fingerprint": "other", "dataset_config_sha256": "cfg"}
    with pytest.raises(ValueError, match=r"state.json: the dataset \(images, captions, repeats or buckets\) changed"):
        changed.run()
    lines = []
    trainer = _trainer(tiny_sd_base, tmp_path, log=lines.append, resume=state, learning_rate=3e-3, max_train_steps=3)
    trainer.resume(state)
    assert trainer.optimizer.param_groups[0]["lr"] == 3e-3  # not the saved 1e-2
    assert "resume: --learning_rate changed from 0.01 to 0.003 (takes effect)" in lines


def test_two_output_names_in_one_folder_keep_their_own_states(tiny_sd_base, tmp_path):
    f8 = _trainer(
        tiny_sd_base,
        tmp_path,
        max_train_steps=4,
        save_every_n_steps=1,
        save_last_n_steps=1,
        save_state=True,
        output_name="f8",
    )
    f1 = _trainer(
        tiny_sd_base,
        tmp_path,
        max_train_steps=4,
        save_every_n_steps=1,
        save_last_n_steps=1,
        save_state=True,
        output_name="f1",
        tsm_stage="vanilla",
    )
    f8.run()
    f1.run()
    assert [os.path.basename(p) for p in list_states(str(tmp_path), "f8")] == ["f8-state-2", "f8-state-3", "f8-state-4"]
    assert [os.path.basename(p) for p in list_states(str(tmp_path), "f1")] == ["f1-state-2", "f1-state-3", "f1-state-4"]


def test_non_finite_loss_says_truly_whether_a_checkpoint_is_kept(tiny_sd_base, tmp_path):
    trainer = _trainer(tiny_sd_base, tmp_path)
    with torch.no_grad():
        for p in trainer.network.trainable_parameters():
            p.fill_(float("nan"))
    batch = CountingBatches(0, [])[0]
    with pytest.raises(NonFiniteLossError, match="no checkpoint of this run was saved yet"):
        trainer.train_step([batch])
    os.makedirs(tmp_path / "tsm-state-5")
    with pytest.raises(NonFiniteLossError, match=f"the last good checkpoint {tmp_path}/tsm-state-5 is kept"):
        trainer.train_step([batch])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square")
    toml = root / "data.toml"
    toml.write_text(
        f'[general]\nresolution = 16\ncaption_extension = ".txt"\n\n[[datasets]]\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images}"\n'
    )
    return images, str(toml)


def test_command_line_guards_the_final_file_and_checks_the_dataset_on_resume(tiny_sd_base, data, tmp_path, capsys):
    images, toml = data
    out = str(tmp_path / "out")
    args = [
        "--pretrained_model",
        tiny_sd_base,
        "--dataset_config",
        toml,
        "--output_dir",
        out,
        "--network_dim",
        "2",
        "--save_every_n_steps",
        "1",
        "--save_state",
    ]
    assert main(args + ["--max_train_steps", "2"]) == 0
    final = os.path.join(out, "tsm.safetensors")
    mtime = os.path.getmtime(final)
    for steps in ("1", "0", "-3"):
        assert main(args + ["--max_train_steps", steps]) == 2
        err = capsys.readouterr().err
        if steps == "1":
            assert f"tsm.safetensors holds 2 training steps and this run would replace it with {steps}" in err
            assert "--overwrite" in err
        else:  # refused by the option check before the file is even looked at
            assert f"--max_train_steps {steps} must be >= 1" in err
        assert "Traceback" not in err
    assert os.path.getmtime(final) == mtime and load_file(final)[1]["ss_steps"] == "2"
    assert main(args + ["--max_train_steps", "1", "--overwrite"]) == 0
    assert load_file(final)[1]["ss_steps"] == "1"
    assert not [n for n in os.listdir(out) if n.endswith(".lock")]  # released
    Image.new("RGB", (16, 16), "white").save(images / "9.png")
    (images / "9.txt").write_text("a white square")
    try:
        assert main(args + ["--max_train_steps", "3", "--resume", "latest"]) == 2
    finally:
        os.remove(images / "9.png")
        os.remove(images / "9.txt")
    err = capsys.readouterr().err
    assert "tsm-state-2/state.json: the dataset (images, captions, repeats or buckets) changed" in err


def test_resume_on_the_real_dataset_uses_the_next_batch_bit_for_bit_and_refuses_a_changed_one(tiny_sd_base, tmp_path):
    from tsm_trainer.training.build import build

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a, {colour}, square")
    toml = tmp_path / "data.toml"  # caption shuffle and flips: the batch depends on (seed, epoch, index)
    toml.write_text(
        f'[general]\nresolution = 16\ncaption_extension = ".txt"\nshuffle_caption = true\nflip_aug = true\n'
        f'\n[[datasets]]\nbatch_size = 1\n\n  [[datasets.subsets]]\n  image_dir = "{images}"\n'
    )

    def run(out, steps, **options):
        trainer = build(
            TrainConfig(
                pretrained_model_name_or_path=str(tiny_sd_base),
                dataset_config=str(toml),
                output_dir=str(out),
                network_dim=2,
                max_train_steps=steps,
                **options,
            ),
            log=lambda m: None,
        )
        dataset, used = trainer.make_batches.__self__, []
        load = dataset.batch
        dataset.batch = lambda epoch, index: used.append(load(epoch, index)) or used[-1]
        trainer.run()
        return trainer, used

    straight, expected = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2, save_state=True)  # 4 batches per epoch: the state is mid-epoch
    resumed, used = run(tmp_path / "b", 3, resume=str(tmp_path / "b" / "tsm-state-2"))
    assert len(used) == 1
    for key in ("keys", "captions", "flipped"):
        assert used[0][key] == expected[2][key]
    assert torch.equal(used[0]["pixels"], expected[2]["pixels"])
    for key, value in straight.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[key], value), key

    (images / "3.txt").write_text("a, yellow, circle")
    with pytest.raises(
        ValueError,
        match=r"tsm-state-2/state.json: the dataset \(images, captions, repeats or "
        r"buckets\) changed since this state was saved",
    ):
        run(tmp_path / "b", 3, resume=str(tmp_path / "b" / "tsm-state-2"))
