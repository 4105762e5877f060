"""train_tsm.py as a kohya trainer: sd-scripts' train_network.py command lines and config files
train; network modules are plugins; every option is checked at start (issue 11, issue 15)."""

import ast
import os

import pytest
import torch
from PIL import Image

from tests.tiny_models import tiny_sd_pipeline_folder
from tsm_trainer.training.cli import main
from tsm_trainer.training.config import ALIASES, FIELDS, load_config
from tsm_trainer.training.kohya_flags import REFUSED

# The options of sd-scripts' train_network.py parser at 48d368fa (setup_parser and the
# add_*_arguments it calls), by destination name.
KOHYA_TRAIN_NETWORK_OPTIONS = """
    console_log_level console_log_file console_log_simple v2 v_parameterization pretrained_model_name_or_path
    tokenizer_cache_dir metadata_title metadata_author metadata_description metadata_license metadata_tags
    metadata_usage_hint metadata_thumbnail metadata_merged_from metadata_trigger_phrase metadata_preprocessor
    metadata_is_negative_embedding train_data_dir cache_info shuffle_caption caption_separator caption_extension
    caption_extention keep_tokens keep_tokens_separator secondary_separator enable_wildcard caption_prefix
    caption_suffix color_aug flip_aug face_crop_aug_range random_crop debug_dataset resolution cache_latents
    vae_batch_size cache_latents_to_disk skip_cache_check enable_bucket min_bucket_reso max_bucket_reso
    bucket_reso_steps bucket_no_upscale resize_interpolation token_warmup_min token_warmup_step alpha_mask
    dataset_class caption_dropout_rate caption_dropout_every_n_epochs caption_tag_dropout_rate reg_data_dir in_json
    dataset_repeats output_dir output_name huggingface_repo_id huggingface_repo_type huggingface_path_in_repo
    huggingface_token huggingface_repo_visibility save_state_to_huggingface resume_from_huggingface async_upload
    save_precision save_every_n_epochs save_every_n_steps save_n_epoch_ratio save_last_n_epochs
    save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_state save_state_on_train_end resume
    train_batch_size max_token_length mem_eff_attn torch_compile dynamo_backend xformers sdpa vae max_train_steps
    max_train_epochs max_data_loader_n_workers persistent_data_loader_workers seed gradient_checkpointing
    gradient_accumulation_steps mixed_precision full_fp16 full_bf16 fp8_base ddp_timeout ddp_gradient_as_bucket_view
    ddp_static_graph clip_skip logging_dir log_with log_prefix log_tracker_name wandb_run_name log_tracker_config
    wandb_api_key log_config noise_offset noise_offset_random_strength multires_noise_iterations ip_noise_gamma
    ip_noise_gamma_random_strength multires_noise_discount adaptive_noise_scale zero_terminal_snr min_timestep
    max_timestep loss_type huber_schedule huber_c huber_scale lowram highvram sample_every_n_steps sample_at_first
    sample_every_n_epochs sample_prompts sample_sampler config_file output_config prior_loss_weight
    conditioning_data_dir masked_loss deepspeed zero_stage offload_optimizer_device offload_optimizer_nvme_path
    offload_param_device offload_param_nvme_path zero3_init_flag zero3_save_16bit_model
    fp16_master_weights_and_gradients optimizer_type use_8bit_adam use_lion_optimizer learning_rate max_grad_norm
    optimizer_args lr_scheduler_type lr_scheduler_args lr_scheduler lr_warmup_steps lr_decay_steps
    lr_scheduler_num_cycles lr_scheduler_power fused_backward_pass lr_scheduler_timescale lr_scheduler_min_lr_ratio
    dataset_config min_snr_gamma scale_v_pred_loss_like_noise_pred v_pred_like_loss debiased_estimation_loss
    weighted_captions cpu_offload_checkpointing no_metadata save_model_as unet_lr text_encoder_lr fp8_base_unet
    network_weights network_module network_dim network_alpha network_dropout network_args network_train_unet_only
    network_train_text_encoder_only training_comment dim_from_weights scale_weight_norms base_weights
    base_weights_multiplier no_half_vae skip_until_initial_step initial_epoch initial_step validation_seed
    validation_split validate_every_n_steps validate_every_n_epochs max_validation_steps
""".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    base = tiny_sd_pipeline_folder(str(root / "base"))
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square")
    toml = root / "data.toml"
    toml.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{images}"\n  num_repeats = 1\n')
    return root, base, str(toml)


def _kohya_command(base, toml, out, *extra):
    """As kohya's docs write it (the dataset flags are defaults of the dataset TOML, as in kohya)."""
    return [
        "--pretrained_model_name_or_path",
        base,
        "--dataset_config",
        toml,
        "--output_dir",
        out,
        "--output_name",
        "mine",
        "--save_model_as",
        "safetensors",
        "--resolution",
        "16",
        "--train_batch_size",
        "2",
        "--caption_extension",
        ".txt",
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--network_dim",
        "2",
        "--network_alpha",
        "1",
        "--mixed_precision",
        "no",
        "--seed",
        "1",
        *extra,
    ]


def _components(base):
    from tsm_trainer.families import get_training_family

    return get_training_family("sd1").load(base)


def test_every_train_network_option_is_implemented_or_refused_by_name():
    implemented = set(FIELDS) | set(ALIASES) | {"config_file"}
    assert not [n for n in KOHYA_TRAIN_NETWORK_OPTIONS if n not in implemented and n not in REFUSED]
    assert not set(REFUSED) & set(FIELDS)


@pytest.mark.skipif(not os.environ.get("TSM_SD_SCRIPTS_DIR"), reason="set TSM_SD_SCRIPTS_DIR to an sd-scripts checkout")
def test_the_list_matches_the_real_sd_scripts_parser():
    """Every ``add_argument("--name")`` of the functions train_network.py's setup_parser calls."""
    root = os.environ["TSM_SD_SCRIPTS_DIR"]
    wanted = {
        "library/train_util.py": {
            "add_sd_models_arguments",
            "add_dataset_arguments",
            "add_training_arguments",
            "add_masked_loss_arguments",
            "add_optimizer_arguments",
        },
        "library/utils.py": {"add_logging_arguments"},
        "library/sai_model_spec.py": {"add_model_spec_arguments"},
        "library/deepspeed_utils.py": {"add_deepspeed_arguments"},
        "library/config_util.py": {"add_config_arguments"},
        "library/custom_train_functions.py": {"add_custom_train_arguments"},
        "train_network.py": {"setup_parser"},
    }
    found = set()
    for path, functions in wanted.items():
        with open(os.path.join(root, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in functions:
                for call in ast.walk(node):
                    if (
                        isinstance(call, ast.Call)
                        and getattr(call.func, "attr", "") == "add_argument"
                        and call.args
                        and isinstance(call.args[0], ast.Constant)
                        and str(call.args[0].value).startswith("--")
                    ):
                        found.add(call.args[0].value[2:])
    assert found == set(KOHYA_TRAIN_NETWORK_OPTIONS)


def test_kohya_command_line_trains_and_the_file_loads_through_the_network_module(world, tmp_path):
    import networks.tsm_lora as tsm_lora
    from tsm_trainer.core.file_format import load_file

    root, base, toml = world
    out = str(tmp_path / "out")
    assert (
        main(
            _kohya_command(
                base,
                toml,
                out,
                "--network_module",
                "networks.tsm_lora",
                "--network_args",
                "tsm_scales=8",
                "--optimizer_type",
                "AdamW8bit",
                "--network_dropout",
                "0.1",
                "--optimizer_args",
                "weight_decay=0.05",
                "betas=0.9,0.99",
            )
        )
        == 0
    )
    path = os.path.join(out, "mine.safetensors")
    tensors, meta = load_file(path)
    assert meta["ss_optimizer"] == "AdamW8bit" and meta["ss_network_dropout"] == "0.1"
    assert '"tsm_scales": "8"' in meta["ss_network_args"]
    c = _components(base)
    network, weights = tsm_lora.create_network_from_weights(1.0, path, c.vae, c.text_encoders[0], c.denoiser)
    network.apply_to(c.text_encoders[0], c.denoiser)
    network.load_weights(path)
    assert network.config.scales == [8] and network.config.rank == 2
    assert any(k.startswith("lora_te_") for k in tensors)  # kohya trains the text encoder unless told not to


def test_plain_kohya_interface_module_trains_through_the_same_loop(world, tmp_path):
    from safetensors.torch import load_file

    import tests.kohya_plain_lora as plain

    root, base, toml = world
    out = str(tmp_path / "out")
    assert (
        main(
            _kohya_command(
                base,
                toml,
                out,
                "--network_module",
                "tests.kohya_plain_lora",
                "--unet_lr",
                "2e-3",
                "--text_encoder_lr",
                "5e-4",
                "--save_precision",
                "fp16",
                "--save_every_n_steps",
                "1",
                "--save_state",
            )
        )
        == 0
    )
    path = os.path.join(out, "mine.safetensors")
    tensors = load_file(path)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))  # it trained
    assert os.path.isfile(os.path.join(out, "mine-step00000001.safetensors")) and os.path.isdir(f"{out}/mine-state-2")
    c = _components(base)
    network, weights = plain.create_network_from_weights(1.0, path, c.vae, c.text_encoders[0], c.denoiser)
    network.apply_to(c.text_encoders[0], c.denoiser)
    missing, unexpected = network.load_weights(path)
    assert not missing and not unexpected
    # resume from its state through the module's own save_weights / load_weights
    assert (
        main(
            _kohya_command(
                base,
                toml,
                out,
                "--network_module",
                "tests.kohya_plain_lora",
                "--max_train_steps",
                "3",
                "--resume",
                f"{out}/mine-state-2",
            )
        )
        == 0
    )


@pytest.mark.skipif(not __import__("importlib").util.find_spec("lycoris"), reason="lycoris-lora is not installed")
def test_lycoris_module_trains(world, tmp_path):
    """preset=attn-mlp: lycoris-lora 4.1.3's default preset targets TimestepEmbedding by class and
    time_embedding.linear_1 by name, which collide on every SD UNet (AssertionError: duplicated lora name)."""
    from lycoris.kohya import create_network_from_weights
    from safetensors.torch import load_file

    root, base, toml = world
    out = str(tmp_path / "out")
    assert (
        main(
            _kohya_command(
                base, toml, out, "--network_module", "lycoris.kohya", "--network_args", "algo=locon", "preset=attn-mlp"
            )
        )
        == 0
    )
    path = os.path.join(out, "mine.safetensors")
    tensors = load_file(path)
    assert tensors and any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_up" in k)
    c = _components(base)
    network, _ = create_network_from_weights(1.0, path, c.vae, c.text_encoders[0], c.denoiser)
    network.apply_to(c.text_encoders[0], c.denoiser, True, True)
    info = network.load_weights(path)
    assert info == {}  # no missing or unexpected keys


def test_kohya_config_file_with_sections_and_the_command_line_wins(world, tmp_path):
    root, base, toml = world
    out = tmp_path / "out"
    config = tmp_path / "kohya_config.toml"
    config.write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "{base}"

[dataset_arguments]
dataset_config = "{toml}"
resolution = "16"
train_batch_size = 2
caption_extension = ".txt"

[training_arguments]
output_dir = "{out}"
output_name = "fromtoml"
max_train_steps = 9
save_model_as = "safetensors"

[network_arguments]
network_module = "networks.tsm_lora"
network_dim = 2
network_alpha = 1
network_args = ["tsm_scales=4"]

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-3
""")
    # kohya appends .toml to a name without it
    assert main(["--config_file", str(config)[:-5], "--max_train_steps", "2"]) == 0
    from tsm_trainer.core.file_format import load_file

    _, meta = load_file(os.path.join(out, "fromtoml.safetensors"))
    assert meta["ss_steps"] == "2" and meta["tsm.scales"] == "[4]"
    config.write_text(f'[training_arguments]\npretrained_model_name_or_path = "{base}"\nin_json = "meta.json"\n')
    with pytest.raises(ValueError, match=r"kohya_config.toml: key 'in_json' is not supported by train_tsm.py"):
        load_config(["--config_file", str(config)])


def test_max_train_epochs_sets_the_steps(world, tmp_path):
    from safetensors import safe_open

    root, base, toml = world
    out = str(tmp_path / "out")
    # 4 images, batch 2: 2 steps an epoch
    assert (
        main(
            _kohya_command(
                base,
                toml,
                out,
                "--network_module",
                "tests.kohya_plain_lora",
                "--max_train_epochs",
                "2",
                "--save_every_n_epochs",
                "1",
                "--network_train_unet_only",
            )
        )
        == 0
    )
    with safe_open(os.path.join(out, "mine.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4" and f.metadata()["ss_epoch"] == "2"
    assert os.path.isfile(os.path.join(out, "mine-000001.safetensors"))  # the last epoch is the final file


@pytest.mark.skipif(
    not hasattr(__import__("tsm_trainer.data", fromlist=["x"]), "folder_dataset_config"),
    reason="kohya folder datasets are not in this checkout yet",
)
def test_kohya_folder_dataset_command_line(world, tmp_path):
    import networks.tsm_lora as tsm_lora

    root, base, _ = world
    concept = tmp_path / "train" / "3_square"
    concept.mkdir(parents=True)
    for i, colour in enumerate(["red", "green"]):
        Image.new("RGB", (16, 16), colour).save(concept / f"{i}.png")
        (concept / f"{i}.txt").write_text(f"a {colour} square")
    out = str(tmp_path / "out")
    argv = _kohya_command(
        base,
        "",
        out,
        "--network_module",
        "networks.tsm_lora",
        "--network_args",
        "tsm_scales=8",
        "--optimizer_type",
        "AdamW8bit",
    )
    argv[argv.index("--dataset_config") : argv.index("--dataset_config") + 2] = [
        "--train_data_dir",
        str(concept.parent),
    ]
    assert main(argv) == 0
    c = _components(base)
    network, _ = tsm_lora.create_network_from_weights(
        1.0, os.path.join(out, "mine.safetensors"), c.vae, c.text_encoders[0], c.denoiser
    )
    assert network.config.scales == [8]


def _fails(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_unimplemented_and_misspelt_kohya_flags_are_refused_at_start(world, tmp_path, capsys):
    root, base, toml = world
    out = str(tmp_path / "never")
    common = _kohya_command(base, toml, out)
    assert (
        "--loraplus_lr_ratio is not supported by train_tsm.py: a network_args key of sd-scripts' networks.lora"
        in _fails(capsys, common + ["--loraplus_lr_ratio", "4"])
    )
    assert "--in_json is not supported by train_tsm.py: fine-tuning metadata JSON" in _fails(
        capsys, common + ["--in_json", "meta.json"]
    )
    assert "--full_fp16 is not supported" in _fails(capsys, common + ["--full_fp16"])
    assert "unknown option --netwrok_dim; did you mean --network_dim?" in _fails(
        capsys, common + ["--netwrok_dim", "4"]
    )
    assert not os.path.exists(out)  # refused before anything was written


def test_debug_shows_the_traceback(world, tmp_path, capsys):
    root, base, toml = world
    assert main(_kohya_command(base, toml, str(tmp_path), "--max_train_steps", "0", "--debug")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: --max_train_steps 0 must be >= 1" in err


def _option_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --n ugly\n")
    return [  # (extra flags, what the one-line error says)
        (["--max_train_steps", "0"], "--max_train_steps 0 must be >= 1"),
        (["--max_train_steps", "-3"], "--max_train_steps -3 must be >= 1"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0 must be >= 1"),
        (["--save_every_n_steps", "-1"], "--save_every_n_steps -1 must be >= 1"),
        (["--save_every_n_steps", "2", "--save_last_n_steps", "0"], "--save_last_n_steps 0 must be >= 1"),
        (["--save_every_n_epochs", "1", "--save_last_n_epochs", "-1"], "--save_last_n_epochs -1 must be >= 1"),
        (["--save_last_n_steps", "3"], "--save_last_n_steps needs --save_every_n_steps"),
        (["--validation_split", "-0.5"], "--validation_split -0.5 must be >= 0"),
        (["--validation_split", "1"], "--validation_split 1.0 must be < 1"),
        (["--learning_rate", "nan"], "argument --learning_rate: invalid finite number value: 'nan'"),
        (["--network_alpha", "nan"], "argument --network_alpha: invalid finite number value: 'nan'"),
        (["--network_alpha", "-1"], "--network_alpha -1.0 must be >= 0"),
        (["--network_dim", "0"], "--network_dim 0 must be >= 1"),
        (["--network_dropout", "1.5"], "--network_dropout 1.5 must be < 1"),
        (["--tsm_interval", "-3"], "--tsm_interval -3: an expert index >= 0, or -1 for all"),
        (["--network_args", "tsm_scales=4", "tsm_interval=4"], "--tsm_interval 4: the scale has 4 experts (0..3)"),
        (["--output_name", ""], "--output_name '': a plain file name stem"),
        (["--output_name", "../x"], "--output_name '../x': a plain file name stem"),
        (["--output_name", ".hidden"], "--output_name '.hidden': a plain file name stem"),
        (["--tsm_experts", str(a_file)], "--tsm_experts only applies with --tsm_stage assemble (not foster)"),
        (["--tsm_mixture", "symmetric"], "--tsm_mixture only applies with --tsm_stage assemble (not foster)"),
        (["--tsm_stage", "vanilla", "--tsm_scales", "4"], "--tsm_scales does not apply with --tsm_stage vanilla"),
        (["--tsm_stage", "assemble", "--tsm_scales", "8,1"], "--tsm_stage assemble needs --tsm_experts"),
        (
            ["--network_args", "tsm_scales=8", "--tsm_scales", "4"],
            "--tsm_scales 4 and --network_args tsm_scales=8 disagree",
        ),
        (["--network_args", "tsm_scales"], "--network_args 'tsm_scales': expected key=value"),
        (
            ["--network_args", "tsm_scale=8"],
            "--network_args tsm_scale: unknown key for networks.tsm_lora; did you mean tsm_scales?",
        ),
        (
            ["--network_module", "tests.kohya_plain_lora", "--tsm_scales", "4"],
            "--tsm_scales only apply with --network_module networks.tsm_lora (not tests.kohya_plain_lora)",
        ),
        (["--network_module", "no_such.module"], "--network_module no_such.module: cannot import it"),
        (["--cache_dir", str(tmp_path)], "--cache_dir needs --cache_latents_to_disk"),
        (
            ["--text_encoder_lr", "1e-4", "--network_train_unet_only"],
            "--text_encoder_lr does not apply with --network_train_unet_only",
        ),
        (["--validate_every_n_steps", "5"], "--validate_every_n_steps needs --validation_split"),
        (["--sample_every_n_steps", "1"], "--sample_every_n_steps needs --sample_prompts"),
        (
            ["--sample_prompts", str(tmp_path / "missing.txt"), "--sample_every_n_steps", "1"],
            "missing.txt: no such file",
        ),
        (
            ["--sample_prompts", str(prompts), "--sample_every_n_steps", "1"],
            "prompts.txt line 1: --n (negative prompts) is not implemented yet",
        ),
        (["--dataset_config", str(tmp_path / "missing.toml")], "--dataset_config"),
        (["--output_dir", str(a_file)], f"--output_dir {a_file}: exists and is not a folder"),
        (["--output_dir", str(a_file / "sub")], "is a file, so the folder cannot be created"),
        (["--resume", str(tmp_path / "nowhere")], "--resume"),
        (["--save_model_as", "ckpt"], "--save_model_as ckpt: only safetensors is written"),
        (["--optimizer_type", "AdamW9bit"], "--optimizer_type AdamW9bit: unknown"),
        (["--optimizer_args", "weight_decay"], "--optimizer_args 'weight_decay': expected key=value"),
        (
            ["--lr_scheduler_num_cycles", "2"],
            "--lr_scheduler_num_cycles only applies with --lr_scheduler cosine_with_restarts (not constant)",
        ),
        (["--lr_warmup_steps", "5"], "--lr_warmup_steps has no effect with --lr_scheduler constant"),
        (["--min_timestep", "500", "--max_timestep", "100"], "--min_timestep 500 must be < --max_timestep 100"),
        (["--clip_skip", "2"], "--clip_skip 2: only 1"),
        (["--scale_weight_norms", "0"], "--scale_weight_norms 0.0 must be > 0"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
        (["--distill_fake_updates", "2"], "--distill_fake_updates only apply with --task distill"),
        (["--v2"], "--v2, but"),
        (["--train_data_dir", str(tmp_path)], "--dataset_config and --train_data_dir exclude each other"),
        (["--network_weights", str(a_file)], f"--network_weights {a_file}: only .safetensors files are loaded"),
    ]


def test_every_bad_option_is_refused_at_start_naming_it(world, tmp_path, capsys):
    root, base, toml = world
    out = tmp_path / "out"
    for extra, expected in _option_cases(tmp_path):
        err = _fails(capsys, _kohya_command(base, toml, str(out), *extra))
        assert expected in err, (extra, err)
        assert not out.exists(), extra  # nothing written: checked before training
