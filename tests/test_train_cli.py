"""train_tsm.py end to end on a tiny SD pipeline and a kohya dataset TOML."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.tiny_models import tiny_sd_pipeline_folder
from tsm_trainer.core.file_format import load_file
from tsm_trainer.training.cli import main
from tsm_trainer.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reloads(base: str, path: str) -> None:
    """The saved file loads back onto the base model (built from its configs), strictly."""
    from tsm_trainer import TSMNetwork
    from tsm_trainer.base_models.loading import load_components

    _, denoiser, encoders = load_components(base)
    network = TSMNetwork.from_file(path, denoiser, [m for _, m in encoders])
    assert network.denoiser_loras


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    base = tiny_sd_pipeline_folder(str(root / "base"))
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow", "red", "blue"]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square")
    (images / "broken.png").write_bytes(b"not a png")
    (images / "broken.txt").write_text("a broken square")
    toml = root / "data.toml"
    toml.write_text(
        f'[general]\nresolution = 16\ncaption_extension = ".txt"\n\n[[datasets]]\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images}"\n  num_repeats = 1\n'
    )
    return root, base, str(toml)


def test_trains_foster_then_assemble_from_the_command_line(setup, capsys):
    root, base, toml = setup
    out = str(root / "out")
    common = [
        "--pretrained_model",
        base,
        "--dataset_config",
        toml,
        "--output_dir",
        out,
        "--max_train_steps",
        "3",
        "--network_dim",
        "2",
        "--learning_rate",
        "1e-3",
        "--validation_split",
        "0.34",
    ]
    assert main(common + ["--tsm_scales", "8", "--output_name", "f8"]) == 0
    assert main(common + ["--tsm_stage", "vanilla", "--output_name", "f1"]) == 0
    assert (
        main(
            common
            + [
                "--tsm_stage",
                "assemble",
                "--tsm_scales",
                "8,1",
                "--output_name",
                "a",
                "--tsm_experts",
                f"{out}/f8.safetensors,{out}/f1.safetensors",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "broken.png" in printed  # reported before training, then skipped
    assert "3 steps x batch 2: 6 samples, about 1 per expert (1/8 each)" in printed
    assert "validation loss per interval:" in printed
    _, meta = load_file(f"{out}/a.safetensors")
    assert meta["tsm.stage"] == "assemble" and meta["tsm.scales"] == "[8, 1]"
    assert meta["modelspec.resolution"] == "16x16"  # the dataset's, not the family's 512
    _reloads(base, f"{out}/a.safetensors")
    assert load_file(f"{out}/f1.safetensors")[1]["tsm.scales"] == "[1]"


def test_config_file_and_command_line(setup, tmp_path):
    root, base, toml = setup
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'pretrained_model = "{base}"\ndataset_config = "{toml}"\nmax_train_steps = 9\nlearning_rate = 3e-4\n'
    )
    config = load_config(["--config", str(cfg), "--max_train_steps", "5"])
    assert config.max_train_steps == 5 and config.learning_rate == 3e-4  # the command line wins
    cfg.write_text(f'pretrained_model = "{base}"\ndataset_config = "{toml}"\nmax_steps = 9\n')
    with pytest.raises(ValueError, match=r"train.toml: unknown key 'max_steps'; did you mean .*max_train_steps\?"):
        load_config(["--config", str(cfg)])
    cfg.write_text(f'pretrained_model = "{base}"\ndataset_config = "{toml}"\nmax_train_steps = "many"\n')
    with pytest.raises(ValueError, match=r"train.toml: max_train_steps = 'many' should be int"):
        load_config(["--config", str(cfg)])


def test_bad_input_stops_with_clear_messages(setup, tmp_path, capsys):
    root, base, toml = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    data = tmp_path / "empty.toml"
    data.write_text(f'[[datasets]]\nresolution = 16\n  [[datasets.subsets]]\n  image_dir = "{empty}"\n')
    assert main(["--pretrained_model", base, "--dataset_config", str(data), "--output_dir", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert (
        main(
            ["--pretrained_model", base, "--dataset_config", toml, "--output_dir", str(tmp_path), "--no-skip_bad_files"]
        )
        == 2
    )
    assert "broken.png" in capsys.readouterr().err
    assert main(["--pretrained_model", base, "--dataset_config", toml, "--family", "flux"]) == 2
    err = capsys.readouterr().err
    assert "--family flux, but" in err and "holds a sd1 model" in err


def test_script_runs_from_the_repo_root(setup):
    root, base, toml = setup
    result = subprocess.run(
        [
            sys.executable,
            "train_tsm.py",
            "--pretrained_model",
            base,
            "--dataset_config",
            toml,
            "--output_dir",
            str(root / "script"),
            "--max_train_steps",
            "1",
            "--tsm_scales",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(root / "script" / "tsm.safetensors")


def test_paper_recipe_runs_all_stages_and_resumes_between_them(setup, capsys):
    root, base, toml = setup
    out = str(root / "recipe")
    args = [
        "--pretrained_model",
        base,
        "--dataset_config",
        toml,
        "--output_dir",
        out,
        "--max_train_steps",
        "2",
        "--network_dim",
        "2",
        "--tsm_recipe",
        "paper",
        "--output_name",
        "r",
        "--save_every_n_steps",
        "1",
        "--save_state",
        "--resume",
        "latest",
    ]
    assert main(args) == 0
    _, meta = load_file(os.path.join(out, "r-assembled", "r.safetensors"))
    assert meta["tsm.stage"] == "assemble" and meta["tsm.scales"] == "[8, 1]"
    os.remove(os.path.join(out, "r-assembled", "r.safetensors"))  # as if stopped during stage 3
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "stage 1/3 (foster 8) already done" in printed and "stage 2/3 (foster 1) already done" in printed
    assert "resumed from" in printed and "state-2" in printed  # stage 3 continued from its last state


def test_video_family_trains_on_frame_folders(tmp_path):
    from tests.tiny_models import tiny_video_pipeline_folder

    base = tiny_video_pipeline_folder(str(tmp_path / "video"))
    clips = tmp_path / "clips"
    for c, colour in enumerate(["red", "blue", "green"]):
        (clips / f"clip{c}").mkdir(parents=True)
        for f in range(3):
            Image.new("RGB", (16, 16), colour).save(clips / f"clip{c}" / f"{f:04d}.png")
        (clips / f"clip{c}.txt").write_text(f"a {colour} square moving")
    toml = tmp_path / "video.toml"
    toml.write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 16\nbatch_size = 2\n'
        f'  [[datasets.subsets]]\n  image_dir = "{clips}"\n  video_frames = 2\n'
    )
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "--pretrained_model",
                base,
                "--dataset_config",
                str(toml),
                "--output_dir",
                out,
                "--max_train_steps",
                "2",
                "--network_dim",
                "2",
                "--tsm_scales",
                "4",
            ]
        )
        == 0
    )
    tensors, meta = load_file(os.path.join(out, "tsm.safetensors"))
    _reloads(base, os.path.join(out, "tsm.safetensors"))
    assert meta["modelspec.architecture"] == "text-to-video-unet3d/lora"
    assert any(".tsm.4." in k and "temp_attentions" in k and "attn1_to_k" in k for k in tensors)


def test_flow_timesteps_are_logit_normal_and_respect_intervals():
    import torch

    from tsm_trainer.families import StableDiffusion3Family

    family = StableDiffusion3Family()
    g = torch.Generator().manual_seed(0)
    t = family.draw_timesteps(0, 1000, 20000, g)
    assert 0 <= t.min() and t.max() < 1000
    assert abs(float(torch.logit(t / 1000).mean())) < 0.05 and abs(float(torch.logit(t / 1000).std()) - 1) < 0.05
    t = family.draw_timesteps(250, 375, 5000, g)
    assert t.min() >= 250 and t.max() < 375


FAMILIES = {  # builder, sample size, metadata that must be written, a key the file must hold, text encoders
    "sdxl": (
        "tiny_sdxl_pipeline_folder",
        32,
        {"ss_base_model_version": "sdxl_base_v1-0"},
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.tsm.4.",
        {"te1", "te2"},
    ),
    "sd3": (
        "tiny_sd3_pipeline_folder",
        16,
        {"tsm.timestep_space": "flow", "modelspec.prediction_type": "rectified_flow"},
        "lora_transformer_transformer_blocks_0_attn_to_q.tsm.4.",
        {"te1", "te2", "te3"},
    ),
    "pixart": (
        "tiny_pixart_pipeline_folder",
        16,
        {"ss_base_model_version": "pixart_alpha"},
        "lora_transformer_transformer_blocks_0_attn1_to_q.tsm.4.",
        {"te"},
    ),
    "flux": (
        "tiny_flux_pipeline_folder",
        16,
        {"tsm.timestep_space": "flow", "ss_base_model_version": "flux1"},
        "lora_transformer_single_transformer_blocks_0_attn_to_q.tsm.4.",
        {"te1", "te3"},
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_saves_reloads_and_samples(setup, tmp_path, family):
    import tests.tiny_models as tiny_models

    builder, size, expected_meta, key_prefix, encoders = FAMILIES[family]
    root, _, toml = setup
    base = getattr(tiny_models, builder)(str(tmp_path / family))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "--pretrained_model",
                base,
                "--dataset_config",
                toml,
                "--output_dir",
                out,
                "--max_train_steps",
                "2",
                "--network_dim",
                "2",
                "--tsm_scales",
                "4",
                "--sample_every_n_steps",
                "2",
                "--sample_prompts",
                str(prompts),
                "--sample_steps",
                "2",
                "--sample_resolution",
                str(size),
            ]
            + (["--network_args", "train_t5xxl=true"] if "te3" in encoders or family == "pixart" else [])
        )
        == 0
    )
    path = os.path.join(out, "tsm.safetensors")
    tensors, meta = load_file(path)
    _reloads(base, path)
    for k, v in expected_meta.items():
        assert meta[k] == v, k
    assert any(k.startswith(key_prefix) for k in tensors)
    assert {k.split("_", 2)[1] for k in tensors if k.startswith("lora_te")} == encoders
    assert os.path.isfile(os.path.join(out, "samples", "step-2.png"))
