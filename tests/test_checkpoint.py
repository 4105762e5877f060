"""Training states: per-output-name folders, damaged state.json, optimizer and run checks."""

import json
import os

import pytest
import torch

from tsm_trainer.core.file_format import load_file, save_file_atomic
from tsm_trainer.training.checkpoint import (
    kept_checkpoint_note,
    latest_state,
    list_states,
    load_state,
    save_state,
    state_folder,
)
from tsm_trainer.training.config import TrainConfig
from tsm_trainer.training.run_record import run_record


class TinyNet:
    """The two methods a state needs of a network, over one Linear layer."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(3, 2)

    def save(self, path):
        save_file_atomic(self.layer.state_dict(), path)

    def load_weights(self, path):
        self.layer.load_state_dict(load_file(path)[0])


def _parts(net, optimizer="adamw", lr=1e-3):
    if optimizer == "adamw":
        opt = torch.optim.AdamW(net.layer.parameters(), lr=lr)
    else:
        from transformers.optimization import Adafactor

        opt = Adafactor(net.layer.parameters(), lr=lr, scale_parameter=False, relative_step=False)
    from diffusers.optimization import get_scheduler

    return opt, get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=100)


def _trained_state(folder, config=None, steps=3, optimizer="adamw"):
    net = TinyNet()
    opt, sched = _parts(net, optimizer)
    for _ in range(steps):
        net.layer(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    extra = {"step": steps, "epoch": 0, "position": steps}
    if config is not None:
        extra["run"] = run_record(config, {"dataset_fingerprint": "abc", "dataset_config_sha256": "def"})
    save_state(str(folder), net, opt, sched, extra)
    return net


def test_states_carry_the_output_name(tmp_path):
    out = str(tmp_path)
    for name in ("f8", "f1"):  # the README's stage-1 layout: two runs, one folder
        for step in (1, 2, 3):
            os.makedirs(state_folder(out, name, step))
    os.makedirs(os.path.join(out, "state-7"))  # the old layout
    assert list_states(out, "f8") == [state_folder(out, "f8", s) for s in (1, 2, 3)]
    assert list_states(out, "f1") == [state_folder(out, "f1", s) for s in (1, 2, 3)]
    assert latest_state(out, "f1") == state_folder(out, "f1", 3)  # its own, not state-7 or f8's


def test_latest_falls_back_to_the_old_layout_and_notes_what_is_kept(tmp_path):
    out = str(tmp_path)
    assert latest_state(out, "tsm") == ""
    assert kept_checkpoint_note(out, "tsm") == "no checkpoint of this run was saved yet"
    save = os.path.join(out, "tsm-step00000003.safetensors")  # a network save without --save_state
    open(save, "wb").close()
    assert kept_checkpoint_note(out, "tsm") == f"the last good checkpoint {save} is kept"
    os.remove(save)
    for step in (2, 10):
        os.makedirs(os.path.join(out, f"state-{step}"))
    assert latest_state(out, "tsm") == os.path.join(out, "state-10")
    os.makedirs(state_folder(out, "tsm", 4))
    assert latest_state(out, "tsm") == state_folder(out, "tsm", 4)
    assert kept_checkpoint_note(out, "tsm") == f"the last good checkpoint {state_folder(out, 'tsm', 4)} is kept"


def _edit(folder, change):
    path = os.path.join(folder, "state.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(change(text))


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t[: len(t) // 2], r"not valid JSON"),
        (lambda t: "[1, 2]", r"should hold a JSON object, not list"),
        (
            lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "step"}),
            r"key 'step' should be an integer >= 0, got None",
        ),
        (
            lambda t: json.dumps({**json.loads(t), "position": "3"}),
            r"key 'position' should be an integer >= 0, got '3'",
        ),
        (lambda t: json.dumps({**json.loads(t), "epoch": -1}), r"key 'epoch' should be an integer >= 0, got -1"),
        (
            lambda t: json.dumps({**json.loads(t), "optimizer": {"scalars": {}}}),
            r"key 'optimizer' should hold 'param_groups'",
        ),
        (lambda t: json.dumps({**json.loads(t), "lr_scheduler": 3}), r"key 'lr_scheduler' should be an object"),
        (
            lambda t: json.dumps({**json.loads(t), "lr_scheduler": {}}),
            r"the optimizer or scheduler state does not fit this run \(KeyError",
        ),
        (lambda t: "\xff\xfe", r"not valid JSON"),
    ],
)
def test_a_damaged_state_json_names_the_file_and_the_problem(tmp_path, change, needle):
    folder = tmp_path / "tsm-state-3"
    _trained_state(folder)
    _edit(folder, change)
    net = TinyNet(seed=1)
    opt, sched = _parts(net)
    with pytest.raises(ValueError, match=rf"{folder}(/state.json)?: {needle}"):
        load_state(str(folder), net, opt, sched)


@pytest.mark.parametrize("legacy", [False, True])
def test_resuming_with_another_optimizer_is_refused_clearly(tmp_path, legacy):
    folder = tmp_path / "tsm-state-3"
    _trained_state(folder, optimizer="adafactor")
    if legacy:  # states saved before the optimizer class was recorded
        _edit(
            folder,
            lambda t: json.dumps(
                {**json.loads(t), "optimizer": {k: v for k, v in json.loads(t)["optimizer"].items() if k != "class"}}
            ),
        )
    net = TinyNet(seed=1)
    opt, sched = _parts(net, "adamw")
    with pytest.raises(ValueError, match=r"state.json: the state was saved with the optimizer .*this run uses AdamW"):
        load_state(str(folder), net, opt, sched)


def test_options_that_must_not_change_stop_the_resume_naming_them(tmp_path):
    saved = TrainConfig(seed=1, network_dim=4)
    folder = tmp_path / "tsm-state-3"
    _trained_state(folder, saved)
    for change, needle in [
        ({"seed": 2}, "--seed was 1 when this state was saved, now 2"),
        ({"network_dim": 8}, "--network_dim was 4"),
        ({"tsm_scales": "4"}, "--tsm_scales was '8'"),
    ]:
        net = TinyNet(seed=1)
        opt, sched = _parts(net)
        current = run_record(
            TrainConfig(**{"seed": 1, "network_dim": 4, **change}),
            {"dataset_fingerprint": "abc", "dataset_config_sha256": "def"},
        )
        with pytest.raises(ValueError, match=rf"state.json: {needle}.*cannot change on resume"):
            load_state(str(folder), net, opt, sched, current)
    for data, needle in [
        ({"dataset_fingerprint": "xyz", "dataset_config_sha256": "def"}, "the dataset"),
        ({"dataset_fingerprint": "abc", "dataset_config_sha256": "000"}, "the dataset config file"),
    ]:
        net = TinyNet(seed=1)
        opt, sched = _parts(net)
        with pytest.raises(ValueError, match=rf"state.json: {needle}.* changed since this state was saved"):
            load_state(str(folder), net, opt, sched, run_record(saved, data))
        assert torch.equal(net.layer.weight, TinyNet(seed=1).layer.weight)  # refused before loading anything


def test_options_that_may_change_take_effect_and_are_printed(tmp_path):
    saved = TrainConfig(learning_rate=1e-3, max_train_steps=100, weight_decay=0.01)
    folder = tmp_path / "tsm-state-3"
    original = _trained_state(folder, saved)
    lines = []
    net = TinyNet(seed=1)
    opt = torch.optim.AdamW(net.layer.parameters(), lr=5e-4, weight_decay=0.1)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=200)
    current = TrainConfig(learning_rate=5e-4, max_train_steps=200, weight_decay=0.1)
    extra = load_state(
        str(folder),
        net,
        opt,
        sched,
        run_record(current, {"dataset_fingerprint": "abc", "dataset_config_sha256": "def"}),
        lines.append,
    )
    assert extra["step"] == 3
    assert torch.equal(net.layer.weight, original.layer.weight)
    assert "resume: --learning_rate changed from 0.001 to 0.0005 (takes effect)" in lines
    assert "resume: --max_train_steps changed from 100 to 200 (takes effect)" in lines
    # the new rate on the new schedule at the saved step, not the saved 1e-3
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * (200 - 3) / 200)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]] and opt.param_groups[0]["weight_decay"] == 0.1
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * (200 - 4) / 200)


def test_a_state_without_a_run_record_is_resumed_with_a_note(tmp_path):
    folder = tmp_path / "state-3"
    _trained_state(folder)
    lines = []
    net = TinyNet(seed=1)
    opt, sched = _parts(net)
    load_state(str(folder), net, opt, sched, run_record(TrainConfig()), lines.append)
    assert "records no run options" in lines[0]
