"""Weights stored in float16 on disk (a diffusers folder with an fp16 text encoder is common; so are
fp16 single files) train on CPU, without and with bf16 autocast."""

import os

import pytest
import torch

from tests.ldm_checkpoints import write_checkpoint
from tests.tiny_models import tiny_sd_pipeline_folder, write_colour_squares
from tsm_trainer.base_models.loading import frozen_weight_dtype
from tsm_trainer.core.file_format import load_file
from tsm_trainer.training.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_colour_squares(tmp_path_factory.mktemp("data"), ["red", "green", "blue", "white"], batch_size=2)


@pytest.fixture(scope="module")
def half_folder(tmp_path_factory):
    """A tiny SD pipeline folder whose UNet, text encoder and VAE are saved in float16."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tiny_sd_pipeline_folder(str(tmp_path_factory.mktemp("half") / "base"))
    for sub, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel), ("vae", AutoencoderKL)):
        model = cls.from_pretrained(os.path.join(folder, sub), local_files_only=True)
        model.half().save_pretrained(os.path.join(folder, sub))
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide mixed-precision setting; each run here chooses its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def trains(base: str, data: str, out: str, *extra: str) -> dict:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    args = [
        "--pretrained_model",
        base,
        "--dataset_config",
        data,
        "--output_dir",
        out,
        "--max_train_steps",
        "2",
        "--network_dim",
        "2",
        "--learning_rate",
        "1e-3",
        *extra,
    ]
    assert main(args) == 0
    tensors, _ = load_file(os.path.join(out, "tsm.safetensors"))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    return tensors


def bf16_autocast_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except RuntimeError:
        return False


def test_fp16_diffusers_folder_trains_on_cpu(half_folder, data, tmp_path):
    from safetensors import safe_open

    with safe_open(os.path.join(half_folder, "text_encoder", "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # really stored in half
    trains(half_folder, data, str(tmp_path / "plain"))
    if bf16_autocast_on_cpu():
        trains(half_folder, data, str(tmp_path / "bf16"), "--mixed_precision", "bf16")


def test_fp16_single_file_trains_on_cpu(data, tmp_path):
    path = str(tmp_path / "half.safetensors")
    write_checkpoint(path, "sd1", dtype=torch.float16)
    trains(path, data, str(tmp_path / "plain"))
    # the saved network loads back onto the module tree built from the single file's header
    from tsm_trainer import TSMNetwork
    from tsm_trainer.base_models.loading import load_components

    _, denoiser, encoders = load_components(path)
    network = TSMNetwork.from_file(str(tmp_path / "plain" / "tsm.safetensors"), denoiser, [m for _, m in encoders])
    assert network.denoiser_loras and network.denoiser_loras[0].lora_name.startswith("lora_unet_down_blocks_0_")
    if bf16_autocast_on_cpu():
        trains(path, data, str(tmp_path / "bf16"), "--mixed_precision", "bf16")


def test_frozen_weight_dtype_rule():
    assert frozen_weight_dtype("fp16", "cpu") == torch.float32 == frozen_weight_dtype("no", "cuda")
    assert frozen_weight_dtype("fp16", "cuda") == torch.float16
    assert frozen_weight_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(ValueError, match="--mixed_precision 'fp8'"):
        frozen_weight_dtype("fp8", "cuda")
