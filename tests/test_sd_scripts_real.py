"""networks.tsm_lora inside kohya-ss sd-scripts' REAL training code (train_network.NetworkTrainer,
library.train_util, networks.lora), on a tiny random-init SD1-shaped model.

Skipped unless TSM_SD_SCRIPTS_DIR points at an sd-scripts checkout (tested: 48d368fa) and the
interpreter has sd-scripts' dependencies (see tests/README or the report of issue 12):

    TSM_SD_SCRIPTS_DIR=/path/to/sd-scripts PYTHONPATH=$PWD /path/to/sd-scripts-venv/bin/python \\
        -m pytest tests/test_sd_scripts_real.py -q

Only model loading is replaced (sd-scripts converts every SD1 checkpoint into its own full-size
UNet; ``TinyTrainer.load_target_model`` returns the tiny diffusers models instead). The tokenizer
comes through sd-scripts' own ``--tokenizer_cache_dir`` lookup; the dataset, accelerator,
optimizer, training loop, metadata and saving are sd-scripts' code, unmodified.
"""

import os
import sys

import pytest
import torch

SD_SCRIPTS = os.environ.get("TSM_SD_SCRIPTS_DIR")
pytestmark = pytest.mark.skipif(not SD_SCRIPTS, reason="set TSM_SD_SCRIPTS_DIR to a kohya-ss sd-scripts checkout")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(train(argv) -> output path, the workspace) with sd-scripts' modules imported from the checkout."""
    sys.path.insert(0, SD_SCRIPTS)
    import train_network
    from library import model_util, strategy_base, train_util

    from tests.tiny_models import tiny_sd_pipeline_folder, tiny_tokenizer, write_colour_squares

    class TinyTrainer(train_network.NetworkTrainer):
        def load_target_model(self, args, weight_dtype, accelerator):
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(
                args.pretrained_model_name_or_path, local_files_only=True, safety_checker=None, feature_extractor=None
            )
            version = model_util.get_model_version_str_for_sd1_sd2(args.v2, args.v_parameterization)
            return version, pipe.text_encoder, pipe.vae, pipe.unet

    root = tmp_path_factory.mktemp("sd_scripts")
    base = tiny_sd_pipeline_folder(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "tokenizers" / "openai_clip-vit-large-patch14"))
    data = write_colour_squares(root / "data", ["red", "green", "blue", "white"], size=64, batch_size=2)

    def train(name, *extra):
        argv = [
            "--pretrained_model_name_or_path",
            base,
            "--dataset_config",
            data,
            "--output_dir",
            str(root / "out"),
            "--output_name",
            name,
            "--tokenizer_cache_dir",
            str(root / "tokenizers"),
            "--max_train_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--optimizer_type",
            "AdamW",
            "--network_module",
            "networks.tsm_lora",
            "--network_dim",
            "2",
            "--network_alpha",
            "2",
            "--seed",
            "0",
            "--max_data_loader_n_workers",
            "0",
            "--mixed_precision",
            "no",
            *extra,
        ]
        parser = train_network.setup_parser()
        args = train_util.read_config_from_file(parser.parse_args(argv), parser)
        for strategy in (
            strategy_base.TokenizeStrategy,
            strategy_base.TextEncodingStrategy,
            strategy_base.LatentsCachingStrategy,
            strategy_base.TextEncoderOutputsCachingStrategy,
        ):
            strategy._strategy = None  # sd-scripts sets them once per process; each test trains anew
        TinyTrainer().train(args)
        return str(root / "out" / f"{name}.safetensors")

    return train, root, base


def _te_keys(path):
    from tsm_trainer.core.file_format import load_file

    return sorted(k for k in load_file(path)[0] if k.startswith("lora_te"))


def test_stage_2_after_a_unet_only_stage_1(sd):
    """The README's recipe with --network_train_unet_only at stage 1 (it failed with 72 missing keys)."""
    train, _, _ = sd
    f8 = train("u8", "--network_args", "tsm_scales=8", "--network_train_unet_only")
    f1 = train("u1", "--network_args", "tsm_scales=1", "--network_train_unet_only")
    assert _te_keys(f8) == []
    out = train("u81", "--network_args", "tsm_scales=8,1", "tsm_stage=assemble", f"tsm_experts={f8},{f1}")
    from tsm_trainer.core.file_format import load_file

    tensors, meta = load_file(out)
    assert meta["tsm.stage"] == "assemble" and any(".router." in k for k in tensors) and _te_keys(out) == []
    assert meta["ss_network_module"] == "networks.tsm_lora" and meta["modelspec.resolution"] == "64x64"


def test_unet_only_stage_2_carries_the_text_encoder_lora(sd):

    from tsm_trainer.core.file_format import load_file

    train, _, _ = sd
    f8 = train("t8", "--network_args", "tsm_scales=8")
    f1 = train("t1", "--network_args", "tsm_scales=1")
    out = train(
        "t81",
        "--network_args",
        "tsm_scales=8,1",
        "tsm_stage=assemble",
        f"tsm_experts={f8},{f1}",
        "--network_train_unet_only",
    )
    fostered, assembled = load_file(f8)[0], load_file(out)[0]
    keys = _te_keys(f8)
    assert keys and _te_keys(out) == keys
    assert all(torch.equal(assembled[k], fostered[k]) for k in keys)  # carried, frozen


def test_ckpt_is_refused_before_training(sd):
    train, root, _ = sd
    with pytest.raises(ValueError, match="--save_model_as ckpt: TSM networks are saved as .safetensors only"):
        train("ck", "--network_args", "tsm_scales=8", "--save_model_as", "ckpt")
    assert not any(name.startswith("ck") for name in os.listdir(root / "out"))


def test_files_are_readable_by_others_and_reload_through_create_network_from_weights(sd):
    from diffusers import StableDiffusionPipeline

    import networks.tsm_lora as tsm_lora

    train, _, base = sd
    old = os.umask(0o022)
    try:
        path = train("m8", "--network_args", "tsm_scales=8")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644  # as sd-scripts' own networks.lora files
    pipe = StableDiffusionPipeline.from_pretrained(
        base, local_files_only=True, safety_checker=None, feature_extractor=None
    )
    network, weights_sd = tsm_lora.create_network_from_weights(1.0, path, pipe.vae, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet)
    info = network.load_weights(path)
    assert info["scales"] == [8] and set(weights_sd) == set(network.state_dict())


def test_key_names_match_sd_scripts_networks_lora(sd):
    """Every module our network targets has the name sd-scripts' own LoRA gives it (networks.lora)."""
    from diffusers import StableDiffusionPipeline

    import networks.lora as kohya_lora
    import networks.tsm_lora as tsm_lora

    _, _, base = sd
    pipe = StableDiffusionPipeline.from_pretrained(
        base, local_files_only=True, safety_checker=None, feature_extractor=None
    )
    theirs = kohya_lora.create_network(1.0, 2, 2, pipe.vae, pipe.text_encoder, pipe.unet)
    ours = tsm_lora.create_network(1.0, 2, 2, pipe.vae, pipe.text_encoder, pipe.unet, tsm_scales="8")
    their_names = {lora.lora_name for lora in theirs.text_encoder_loras + theirs.unet_loras}
    our_names = {lora.lora_name for lora in ours.all_loras}
    assert our_names and our_names <= their_names, sorted(our_names - their_names)[:3]
