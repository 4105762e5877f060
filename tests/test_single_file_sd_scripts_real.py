"""Single files written by kohya-ss sd-scripts' REAL code load here as sd-scripts itself reads them.

sd-scripts' ``library/model_util.py`` converts diffusers-layout models into the LDM layout
(``save_stable_diffusion_checkpoint``: what its fine-tuning scripts and ``convert_diffusers20_original_sd.py``
write) and back (``load_models_from_stable_diffusion_checkpoint``). Its converters are written for
the full-size SD 1.x / 2.x architectures, so this test uses random-init full-size models (about
1.1 B parameters each; a few minutes and ~10 GB of memory on CPU).

Skipped unless TSM_SD_SCRIPTS_DIR points at an sd-scripts checkout (tested: 48d368fa) and the
interpreter has sd-scripts' dependencies (torchvision among them, so not the project's venv):

    TSM_SD_SCRIPTS_DIR=/path/to/sd-scripts PYTHONPATH=$PWD /path/to/sd-scripts-venv/bin/python \\
        -m pytest tests/test_single_file_sd_scripts_real.py -q
"""

import gc
import os
import sys

import pytest
import torch

SD_SCRIPTS = os.environ.get("TSM_SD_SCRIPTS_DIR")
pytestmark = pytest.mark.skipif(not SD_SCRIPTS, reason="set TSM_SD_SCRIPTS_DIR to a kohya-ss sd-scripts checkout")


def text_config(v2: bool):
    """The CLIP text configs sd-scripts' loader builds (model_util.load_models_from_stable_diffusion_checkpoint)."""
    from transformers import CLIPTextConfig

    if v2:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def outputs(unet, text_encoder, vae, v2: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700])
    ctx = torch.randn(1, 77, 1024 if v2 else 768, generator=g)
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        return {"unet": unet(x, t, ctx).sample, "text": text_encoder(ids)[0], "vae": vae.encode(image).latent_dist.mean}


@pytest.mark.parametrize("v2", [False, True], ids=["sd1", "sd2"])
def test_file_saved_by_sd_scripts_loads_like_sd_scripts_loads_it(tmp_path, v2):
    sys.path.insert(0, SD_SCRIPTS)
    from library import model_util
    from transformers import CLIPTextModel

    from tsm_trainer.base_models.single_file import (
        build_text_encoder,
        build_unet,
        build_vae,
        describe,
        settle_prediction_type,
    )

    torch.manual_seed(0)
    unet = model_util.UNet2DConditionModel(**model_util.create_unet_diffusers_config(v2, v2))
    vae = model_util.AutoencoderKL(**model_util.create_vae_diffusers_config())
    text_encoder = CLIPTextModel(text_config(v2))
    path = str(tmp_path / "model.safetensors")
    model_util.save_stable_diffusion_checkpoint(v2, path, text_encoder, unet, None, 0, 0, None, torch.float16, vae)
    del unet, vae, text_encoder
    gc.collect()

    text_encoder, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(v2, path)
    want = outputs(unet, text_encoder, vae, v2)
    del unet, vae, text_encoder
    gc.collect()

    model = describe(path)
    assert model.family == ("sd2" if v2 else "sd1")
    assert model.unet["block_out_channels"] == [320, 640, 1280, 1280] and model.unet["layers_per_block"] == 2
    assert model.text_encoders[0]["num_hidden_layers"] == (23 if v2 else 12)
    unet = build_unet(model, True, torch.float32)
    settle_prediction_type(model, unet)  # the file records nothing: a full-size SD 2 UNet gets A1111's test run
    assert model.prediction_source == ("A1111's test run" if v2 else "default")
    got = outputs(unet, build_text_encoder(model, 0, True, torch.float32), build_vae(model, True, torch.float32), v2)
    torch.testing.assert_close(got["text"], want["text"])
    torch.testing.assert_close(got["vae"], want["vae"])
    # sd-scripts runs its own UNet implementation (library.original_unet): equal up to float rounding
    torch.testing.assert_close(got["unet"], want["unet"], rtol=1e-3, atol=1e-4)
