"""sd-scripts ``train_network.py`` options (kohya-ss/sd-scripts 48d368fa) that ``train_tsm.py``
does not implement, each with why and what to use instead. They are refused at start, by name,
on the command line and in a ``--config_file``; never ignored.

Every other flag of train_network.py's parser is implemented (``config.TrainConfig``);
tests/test_kohya_cli.py checks that the two lists cover the parser.
"""

from __future__ import annotations

_LOGGING = "logging goes to the console and TensorBoard (--logging_dir)"
_METADATA = "the file's modelspec.* metadata is written by the trainer; custom fields are not supported yet"
_NOT_DATA = "this dataset feature is not implemented"
_OFFLINE = "this trainer works offline (no Hugging Face uploads or downloads)"
_SAVE = "use --save_last_n_steps / --save_last_n_epochs (states follow them)"
_DDP = "multi-process training goes through accelerate launch / torchrun with their own options"
_TRACKER = "only TensorBoard (--logging_dir, --log_prefix) is implemented"
_NOISE = "this noise/loss variant is not implemented (--noise_offset and --min_snr_gamma are)"
_DEEPSPEED = "DeepSpeed is not supported"
_SCHED = "only --lr_scheduler with --lr_warmup_steps, --lr_scheduler_num_cycles and --lr_scheduler_power"
_LOSS = "this loss variant is not implemented (--min_snr_gamma is)"
_FP8 = "fp8 base weights are not implemented; use --mixed_precision fp16/bf16"
_VALIDATION = "validation uses --validation_split and --validate_every_n_steps only"
_LORAPLUS = (
    "a network_args key of sd-scripts' networks.lora (LoRA+), not a flag; networks.tsm_lora does not implement LoRA+"
)

REFUSED: dict[str, str] = {
    **dict.fromkeys(("console_log_level", "console_log_file", "console_log_simple"), _LOGGING),
    **dict.fromkeys(
        (
            "metadata_title",
            "metadata_author",
            "metadata_description",
            "metadata_license",
            "metadata_tags",
            "metadata_usage_hint",
            "metadata_thumbnail",
            "metadata_merged_from",
            "metadata_trigger_phrase",
            "metadata_preprocessor",
            "metadata_is_negative_embedding",
        ),
        _METADATA,
    ),
    "cache_info": "kohya's image-size cache is not implemented (image sizes are read at each scan)",
    **dict.fromkeys(
        (
            "color_aug",
            "face_crop_aug_range",
            "token_warmup_min",
            "token_warmup_step",
            "alpha_mask",
            "resize_interpolation",
            "dataset_class",
            "conditioning_data_dir",
            "masked_loss",
            "weighted_captions",
            "debug_dataset",
            "vae_batch_size",
            "skip_cache_check",
        ),
        _NOT_DATA,
    ),
    "in_json": "fine-tuning metadata JSON datasets are out of scope; use --train_data_dir or --dataset_config",
    "dataset_repeats": "only with --in_json, which is out of scope; repeats come from N_concept folders or num_repeats",
    **dict.fromkeys(
        (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
            "async_upload",
        ),
        _OFFLINE,
    ),
    **dict.fromkeys(("save_n_epoch_ratio", "save_last_n_epochs_state", "save_last_n_steps_state"), _SAVE),
    "save_state_on_train_end": "use --save_state with --save_every_n_steps / --save_every_n_epochs",
    "max_token_length": "captions are encoded at the tokenizer's length (77 tokens for CLIP)",
    "mem_eff_attn": "use --sdpa (the default) or --xformers",
    **dict.fromkeys(("torch_compile", "dynamo_backend"), "torch.compile is not supported"),
    "vae": "the VAE comes from the base model",
    "full_fp16": "LoRA weights train in float32 under autocast; use --mixed_precision fp16 (same memory for LoRA)",
    "full_bf16": "LoRA weights train in float32 under autocast; use --mixed_precision bf16 (same memory for LoRA)",
    **dict.fromkeys(("fp8_base", "fp8_base_unet"), _FP8),
    **dict.fromkeys(("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph"), _DDP),
    **dict.fromkeys(
        ("log_tracker_name", "wandb_run_name", "log_tracker_config", "wandb_api_key", "log_config"), _TRACKER
    ),
    **dict.fromkeys(
        (
            "noise_offset_random_strength",
            "multires_noise_iterations",
            "multires_noise_discount",
            "ip_noise_gamma",
            "ip_noise_gamma_random_strength",
            "adaptive_noise_scale",
            "zero_terminal_snr",
        ),
        _NOISE,
    ),
    **dict.fromkeys(
        (
            "loss_type",
            "huber_schedule",
            "huber_c",
            "huber_scale",
            "scale_v_pred_loss_like_noise_pred",
            "v_pred_like_loss",
            "debiased_estimation_loss",
        ),
        _LOSS,
    ),
    "highvram": "not needed: latents and models stay on the device anyway",
    "sample_at_first": "not implemented; use --sample_every_n_steps",
    "output_config": "writing a config file is not implemented",
    **dict.fromkeys(
        (
            "deepspeed",
            "zero_stage",
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients",
        ),
        _DEEPSPEED,
    ),
    "use_8bit_adam": "use --optimizer_type AdamW8bit",
    "use_lion_optimizer": "use --optimizer_type Lion",
    **dict.fromkeys(
        (
            "lr_scheduler_type",
            "lr_scheduler_args",
            "lr_decay_steps",
            "lr_scheduler_timescale",
            "lr_scheduler_min_lr_ratio",
        ),
        _SCHED,
    ),
    "fused_backward_pass": "not implemented (AdamW already uses the fused kernel where the device has one)",
    "cpu_offload_checkpointing": "not implemented; --gradient_checkpointing is",
    "no_metadata": "TSM files need their tsm.* metadata to load",
    **dict.fromkeys(
        ("base_weights", "base_weights_multiplier"), "merging networks into the base before training is not implemented"
    ),
    **dict.fromkeys(("skip_until_initial_step", "initial_epoch", "initial_step"), "use --resume with a saved state"),
    **dict.fromkeys(("validation_seed", "validate_every_n_epochs", "max_validation_steps"), _VALIDATION),
    # not flags of train_network.py, but names kohya users meet in guides
    **dict.fromkeys(("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"), _LORAPLUS),
}
