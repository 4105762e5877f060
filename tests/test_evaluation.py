"""tools/evaluate.py and tsm_trainer.evaluation: held-out loss per interval with one fixed draw,
plain and native files, plots, and the demo world's attribute score."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from demo_world import shapes
from demo_world.attribute_score import all_combos, attribute_score, heldout_combos, score_images
from tests.tiny_models import tiny_sd_pipeline_folder, write_colour_squares
from tests.tool_scripts import tool_main
from tsm_trainer.core.file_format import TSMFileError, load_file, save_file_atomic
from tsm_trainer.evaluation import evaluate_files
from tsm_trainer.evaluation.heldout import heldout_batches
from tsm_trainer.families import get_training_family
from tsm_trainer.files.export import expert_lora
from tsm_trainer.training.cli import main as train_main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD model, 8 images, a vanilla LoRA trained on them, the same with half its change, a TSM n=4 file."""
    root = tmp_path_factory.mktemp("eval")
    base = tiny_sd_pipeline_folder(str(root / "base"))
    toml = write_colour_squares(root, ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"])
    out = str(root / "out")
    common = [
        "--pretrained_model",
        base,
        "--dataset_config",
        str(toml),
        "--output_dir",
        out,
        "--network_dim",
        "4",
        "--learning_rate",
        "1e-2",
        "--max_train_steps",
        "40",
        "--network_train_unet_only",
    ]
    assert train_main(common + ["--tsm_stage", "vanilla", "--output_name", "good"]) == 0
    assert train_main(common + ["--tsm_scales", "4", "--output_name", "tsm4", "--max_train_steps", "4"]) == 0
    tensors, meta = load_file(f"{out}/good.safetensors")
    half = {k: 0.5 * v if "lora_up" in k else v for k, v in tensors.items()}  # half of the learned change
    save_file_atomic(half, f"{out}/half.safetensors", meta)
    family = get_training_family("sd1")
    return {
        "root": root,
        "base": base,
        "toml": str(toml),
        "out": out,
        "family": family,
        "components": family.load(base),
        "batches": heldout_batches(str(toml), log=lambda m: None),
    }


def _evaluate(world, files, **kw):
    return evaluate_files(
        world["family"], world["components"], world["batches"], files, bins=8, log=lambda m: None, **kw
    )


def test_known_better_lora_scores_better(world):
    out = world["out"]
    result = _evaluate(world, [f"{out}/half.safetensors", f"{out}/good.safetensors"])
    base, half, good = (result.mean_loss(k) for k in ("base model", "half", "good"))
    assert good < half < base, (good, half, base)


def test_identical_files_score_identically_and_the_draw_is_shared(world, tmp_path):
    out = world["out"]
    copy = str(tmp_path / "copy.safetensors")
    shutil.copyfile(f"{out}/tsm4.safetensors", copy)
    family = world["family"]
    seen = []  # (label order) the noise and timesteps every model was evaluated on
    original = family.noisy_input_and_target

    def recording(c, latents, noise, timesteps):
        seen.append((latents.clone(), noise.clone(), timesteps.clone()))
        return original(c, latents, noise, timesteps)

    family.noisy_input_and_target = recording
    try:
        result = _evaluate(world, [f"{out}/tsm4.safetensors", copy])
    finally:
        del family.noisy_input_and_target
    assert result.losses["tsm4"] == result.losses["copy"]
    assert result.losses["tsm4"] != result.losses["base model"]
    per_model = len(seen) // 3
    assert per_model == 8 * len(world["batches"])
    for k in range(per_model):
        for other in (per_model + k, 2 * per_model + k):
            assert all(torch.equal(a, b) for a, b in zip(seen[k], seen[other]))
    # t really is stratified: bin i only draws t in [125 i, 125 (i + 1))
    for k, (_, _, t) in enumerate(seen[:per_model]):
        i = k % 8
        assert ((t >= 125 * i) & (t < 125 * (i + 1))).all()


def test_plain_kohya_lora_equals_its_native_file(world, tmp_path):
    tensors, meta = load_file(f"{world['out']}/good.safetensors")
    plain = str(tmp_path / "plain.safetensors")
    save_file_atomic(expert_lora(tensors, 1, 0), plain, {"ss_network_dim": "4"})
    result = _evaluate(world, [f"{world['out']}/good.safetensors", plain], include_base=False)
    assert result.losses["good"] == pytest.approx(result.losses["plain"], rel=1e-6)
    bad = str(tmp_path / "loha.safetensors")
    save_file_atomic({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, bad, {})
    with pytest.raises(TSMFileError, match="loha.safetensors.*hada_w1_a"):
        _evaluate(world, [bad], include_base=False)


def test_evaluate_cli_writes_table_plot_and_grid(world, tmp_path, capsys):
    main = tool_main("evaluate")
    out = world["out"]
    dest = tmp_path / "eval"
    assert (
        main(
            [
                "--pretrained_model",
                world["base"],
                "--dataset_config",
                world["toml"],
                "--validation_split",
                "0.25",
                "--files",
                f"{out}/good.safetensors",
                f"{out}/tsm4.safetensors",
                "--labels",
                "LoRA",
                "TSM n=4",
                "--bins",
                "16",
                "--sample_steps",
                "2",
                "--output_dir",
                str(dest),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[0,125)" in printed and "TSM n=4" in printed
    report = json.loads((dest / "losses.json").read_text())
    assert report["images"] == 2  # every 4th of 8 images held out
    assert set(report["losses_per_interval"]) == {"base model", "LoRA", "TSM n=4"}
    assert all(len(v) == 16 for v in report["losses_per_bin"].values())
    assert Image.open(dest / "loss_vs_t.png").size[0] > 600
    grid = Image.open(dest / "samples.png")
    assert grid.size[1] == 3 * 64  # one row per model
    with pytest.raises(SystemExit):
        main(
            [
                "--pretrained_model",
                world["base"],
                "--dataset_config",
                world["toml"],
                "--files",
                f"{out}/good.safetensors",
                "--labels",
                "a",
                "b",
            ]
        )
    assert "2 labels for 1 files" in capsys.readouterr().err


def test_attribute_score_reads_renders_and_penalises_wrong_ones():
    combos = all_combos("target")
    assert len(combos) == 75 and len(heldout_combos("target")) == 15
    held = heldout_combos("target")
    for key, values in (
        ("shape", shapes.SHAPES),
        ("colour", shapes.TARGET_COLOURS),
        ("background", shapes.BACKGROUNDS),
    ):
        assert {a[key] for a in held} == set(values)  # every word still appears held out ...
    rest = [a for a in combos if a not in held]
    for a in held:  # ... and in training, with the held-out combination never shown
        assert any(r["shape"] == a["shape"] and r["colour"] == a["colour"] for r in rest)

    def words(prompt):  # "a {colour} {shape} on a {background} background"
        w = prompt.split()
        return w[1], w[2], w[5]

    def faithful(prompts, seed):
        rng = np.random.default_rng(seed)
        return [shapes.render(shape, colour, bg, rng=rng) for colour, shape, bg in map(words, prompts)]

    def wrong_colour(prompts, seed):
        rng = np.random.default_rng(seed)
        swap = {"pink": "cyan", "cyan": "brown", "brown": "pink"}
        return [shapes.render(shape, swap[colour], bg, rng=rng) for colour, shape, bg in map(words, prompts)]

    good = attribute_score(faithful, held, seeds=[0, 1])
    assert good["n"] == 30 and min(good[k] for k in ("colour", "shape", "background")) >= 0.9
    bad = attribute_score(wrong_colour, held, seeds=[0, 1])
    assert bad["colour"] <= 0.1 and bad["shape"] >= 0.9 and bad["all"] <= 0.1
    with pytest.raises(ValueError, match="one attribute dict per image"):
        score_images([Image.new("RGB", (64, 64))], [])


def test_held_out_combinations_never_reach_the_training_images(tmp_path):
    held = {shapes.combo(a) for a in heldout_combos("target")}
    records = shapes.write_dataset(str(tmp_path), 120, "target", seed=3, exclude=held)
    assert not {shapes.combo(r) for r in records} & held
    assert len({shapes.combo(r) for r in records}) > 40
