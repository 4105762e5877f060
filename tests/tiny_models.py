"""Tiny random-init models for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import os

import torch


def tiny_unet(cross_attention_dim: int = 16, seed: int = 0, **overrides):
    """SD-shaped diffusers UNet2DConditionModel with a few thousand parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_clip(hidden_size: int = 16, seed: int = 0, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_sdxl_unet(seed: int = 0, **overrides):
    """SDXL-shaped diffusers UNet2DConditionModel (text_time conditioning, 3 blocks, 2 layers per block)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_unet3d(seed: int = 0, **overrides):
    """Text-to-video diffusers UNet3DConditionModel (sample is (B, C, F, H, W))."""
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config.update(overrides)
    return UNet3DConditionModel(**config).eval()


def tiny_sd3(seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    )
    config.update(overrides)
    return SD3Transformer2DModel(**config).eval()


def tiny_flux(seed: int = 0, **overrides):
    """FluxTransformer2DModel; called with packed latents (B, S, 4), img_ids (S, 3), txt_ids (L, 3), timestep=sigma."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    config = dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )
    config.update(overrides)
    return FluxTransformer2DModel(**config).eval()


def tiny_pixart(seed: int = 0, **overrides):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    config = dict(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=16,
        use_additional_conditions=False,
    )
    config.update(overrides)
    return PixArtTransformer2DModel(**config).eval()


def tiny_t5(d_model: int = 16, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=100, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def tiny_vae(**overrides):
    """A one-block AutoencoderKL (4 latent channels); seed torch's generator first for fixed weights."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=8,
    )
    config.update(overrides)
    return AutoencoderKL(**config)


def save_pipeline_folder(folder, pipeline_class: str, parts: dict, **index_extra) -> str:
    """Save each part (model, scheduler, tokenizer) to ``folder/<name>`` and write model_index.json
    naming each part's (library, class), as diffusers' ``save_pretrained`` of a pipeline does."""
    import json

    os.makedirs(folder, exist_ok=True)
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    for name, part in parts.items():
        part.save_pretrained(os.path.join(folder, name))
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    index.update(index_extra)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


def tiny_sd_pipeline_folder(folder, seed: int = 0):
    """Write a tiny SD1-shaped diffusers pipeline (UNet, CLIP, VAE, scheduler) to ``folder``."""
    from diffusers import DDPMScheduler

    unet, te = tiny_unet(seed=seed), tiny_clip(seed=seed)
    torch.manual_seed(seed)
    parts = dict(unet=unet, text_encoder=te, vae=tiny_vae())
    parts.update(scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False), tokenizer=tiny_tokenizer())
    return save_pipeline_folder(
        folder,
        "StableDiffusionPipeline",
        parts,
        safety_checker=[None, None],
        feature_extractor=[None, None],
        requires_safety_checker=False,
    )


def tiny_tokenizer():
    """A CLIP BPE tokenizer over single characters (ids < 100), built from a local vocab."""
    import json
    import os
    import tempfile

    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=77)


def randomise(module, seed: int = 0, std: float = 0.3) -> None:
    """Random values for every non-scalar parameter (lora_up starts at zero), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write_assembled_file(folder, name: str = "a81.safetensors") -> str:
    """Foster [8] and [1] on a tiny UNet, assemble [8, 1] with non-zero routers, save; returns the path."""
    import os

    import networks.tsm_lora as tsm_lora

    unet = tiny_unet()
    parts = []
    for scales, seed in (("8", 1), ("1", 2)):
        net = tsm_lora.create_network(1.0, 2, 2, None, None, unet, tsm_scales=scales)
        randomise(net, seed)
        parts.append(os.path.join(str(folder), f"_part{scales}.safetensors"))
        net.save_weights(parts[-1], None, None)
    net = tsm_lora.create_network(
        1.0, 2, 2, None, None, unet, tsm_scales="8,1", tsm_stage="assemble", tsm_experts=",".join(parts)
    )
    with torch.no_grad():
        for lora in net.denoiser_loras:
            lora.router.embedding.normal_(0, 0.5)
            lora.router.fc.weight.normal_(0, 0.5)
    path = os.path.join(str(folder), name)
    net.save_weights(path, None, None)
    return path


def tiny_sdxl_pipeline_folder(folder, seed: int = 0):
    """Write a tiny SDXL-shaped diffusers pipeline: two CLIP encoders (8 + 8 wide, pooled 16)."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = tiny_sdxl_unet(seed=seed)  # cross_attention_dim 16 = 8 + 8; pooled 16 + 6 * 4 time ids
    torch.manual_seed(seed)
    common = dict(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    te1 = CLIPTextModel(CLIPTextConfig(**common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=16, **common)).eval()
    parts = dict(unet=unet, text_encoder=te1, text_encoder_2=te2, vae=tiny_vae())
    parts.update(
        scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
    )
    return save_pipeline_folder(folder, "StableDiffusionXLPipeline", parts)


def tiny_video_pipeline_folder(folder, seed: int = 0):
    """A tiny text-to-video pipeline folder (UNet3DConditionModel + image VAE + CLIP)."""
    import json
    import os

    tiny_sd_pipeline_folder(folder, seed)  # VAE, CLIP, tokenizer, scheduler
    tiny_unet3d(seed=seed).save_pretrained(os.path.join(folder, "unet"))
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index.update({"_class_name": "TextToVideoSDPipeline", "unet": ["diffusers", "UNet3DConditionModel"]})
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        index.pop(key, None)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over single letters, built locally."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=16)


def tiny_sd3_pipeline_folder(folder, seed: int = 0):
    """A tiny SD3-shaped pipeline: MM-DiT, two CLIP-with-projection encoders (8 wide, pooled 8 + 8),
    a T5 encoder (16 wide), VAE, flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    transformer = tiny_sd3(seed=seed)  # joint_attention_dim 16, pooled_projection_dim 16
    torch.manual_seed(seed)
    common = dict(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=8,
    )
    te1, te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**common)).eval() for _ in range(2))
    te3 = tiny_t5(d_model=16, seed=seed)
    parts = dict(
        transformer=transformer,
        text_encoder=te1,
        text_encoder_2=te2,
        text_encoder_3=te3,
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
    )
    parts.update(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    return save_pipeline_folder(folder, "StableDiffusion3Pipeline", parts)


def tiny_pixart_pipeline_folder(folder, seed: int = 0):
    """A tiny PixArt-alpha pipeline: DiT (learned sigma), T5 (16 wide), VAE, DDPM scheduler."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    vae = tiny_vae()
    parts = dict(transformer=tiny_pixart(seed=seed), text_encoder=tiny_t5(16, seed), vae=vae)
    parts.update(scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False), tokenizer=tiny_t5_tokenizer())
    return save_pipeline_folder(folder, "PixArtAlphaPipeline", parts)


def tiny_flux_pipeline_folder(folder, seed: int = 0):
    """A tiny Flux pipeline: transformer on 2x2-packed 4-channel latents, CLIP (pooled 16), T5 (16 wide)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_flux(seed=seed, in_channels=16)
    torch.manual_seed(seed)
    vae = tiny_vae(shift_factor=0.1, scaling_factor=1.5)
    parts = dict(
        transformer=transformer,
        text_encoder=tiny_clip(hidden_size=16, seed=seed),
        text_encoder_2=tiny_t5(16, seed),
        vae=vae,
    )
    parts.update(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_t5_tokenizer(),
    )
    return save_pipeline_folder(folder, "FluxPipeline", parts)


def write_colour_squares(root, colours, size: int = 16, batch_size: int = 4) -> str:
    """One solid ``size`` x ``size`` image per colour in ``root/images`` captioned "a {colour} square", and
    a kohya dataset TOML for them; returns the TOML's path."""
    from PIL import Image

    from tsm_trainer.data import write_dataset_config

    images = os.path.join(str(root), "images")
    os.makedirs(images, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (size, size), colour).save(os.path.join(images, f"{i}.png"))
        with open(os.path.join(images, f"{i}.txt"), "w") as f:
            f.write(f"a {colour} square")
    return write_dataset_config(os.path.join(str(root), "data.toml"), images, resolution=size, batch_size=batch_size)
