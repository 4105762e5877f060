"""Tiny single-file checkpoints in the original LDM / SGM key layouts (what A1111 and sd-scripts
read), written from tiny diffusers / transformers models so a test can compare what the loader
rebuilds with the models that were saved.

UNet keys come from the project's diffusers -> SGM module names (``key_names``); VAE and text
encoder keys from the mappings below, written for these tests (the loader uses diffusers' own
converters, so a round trip checks one against the other).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from tsm_trainer.core.key_names import diffusers_unet_to_sgm

CLIP_VOCAB = 49408  # the real CLIP BPE vocabulary, so the shipped tokenizer path is exercised


def tiny_ldm_unet(kind: str, cross: int, pooled: int = 0, seed: int = 0):
    """A diffusers UNet2DConditionModel shaped like SD 1 ("sd1"), SD 2 ("sd2") or SDXL ("sdxl"),
    with channels that the loader's full-size rules (32 norm groups, 8 heads or 64-wide heads) fit."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        cross_attention_dim=cross,
        norm_num_groups=32,
    )
    if kind == "sd1":
        config = dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
        )
    elif kind == "sd2":
        config = dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=[1, 1],
            use_linear_projection=True,
        )
    else:
        config = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[1, 1],
            use_linear_projection=True,
            transformer_layers_per_block=[1, 2],
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=pooled + 6 * 8,
        )
    return UNet2DConditionModel(**common, **config).eval()


def tiny_ldm_vae(seed: int = 0, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_ldm_clip(
    width: int,
    layers: int = 2,
    projection: bool = False,
    vocab: int = CLIP_VOCAB,
    seed: int = 0,
    hidden_act: str = "quick_gelu",
):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act=hidden_act,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    L = unet.config.layers_per_block
    with_attention = frozenset(i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t)
    return {
        "model.diffusion_model." + diffusers_unet_to_sgm(k, L, with_attention): v for k, v in unet.state_dict().items()
    }


def _vae_part(key: str, blocks: int) -> str:
    parts = key.split(".")
    side = parts[0]
    rest = ".".join(parts[1:])
    renames = {"conv_norm_out": "norm_out", "conv_shortcut": "nin_shortcut"}
    if rest.startswith(("down_blocks.", "up_blocks.")):
        _, i, kind, j, *tail = rest.split(".")
        i = int(i) if side == "encoder" else blocks - 1 - int(i)
        level = f"{'down' if side == 'encoder' else 'up'}.{i}"
        if kind == "resnets":
            tail = [renames.get(t, t) for t in tail]
            return f"{side}.{level}.block.{j}." + ".".join(tail)
        return f"{side}.{level}.{'downsample' if side == 'encoder' else 'upsample'}." + ".".join(tail)
    if rest.startswith("mid_block.resnets."):
        _, _, j, *tail = rest.split(".")
        tail = [renames.get(t, t) for t in tail]
        return f"{side}.mid.block_{int(j) + 1}." + ".".join(tail)
    if rest.startswith("mid_block.attentions.0."):
        tail = rest[len("mid_block.attentions.0.") :]
        tail = (
            {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}.get(
                tail.rsplit(".", 1)[0], tail.rsplit(".", 1)[0]
            )
            + "."
            + tail.rsplit(".", 1)[1]
        )
        return f"{side}.mid.attn_1.{tail}"
    return ".".join([side] + [renames.get(p, p) for p in parts[1:]]) if side in ("encoder", "decoder") else key


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        ldm = _vae_part(k, blocks)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        out["first_stage_model." + ldm] = v
    return out


def clip_to_ldm(te, prefix: str) -> dict[str, torch.Tensor]:
    """HF layout under ``prefix`` (SD 1 ``cond_stage_model.transformer.``, SDXL
    ``conditioner.embedders.0.transformer.``)."""
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in te.state_dict().items()
        if not k.startswith("text_projection")
    }


def clip_to_open_clip(te, prefix: str, extra_layer: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    """OpenCLIP layout under ``prefix``; ``extra_layer`` appends one more (unused) resblock, as SD 2
    files hold the last OpenCLIP layer that SD 2 skips."""
    sd = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    width = sd["embeddings.token_embedding.weight"].shape[1]
    out[prefix + "text_projection"] = (
        sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd else torch.eye(width)
    )
    layers = te.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    for i in range(layers + int(extra_layer)):
        src = f"encoder.layers.{i}."
        get = (
            (lambda name: sd[src + name])  # noqa: B023 (used in this iteration only)
            if i < layers
            else (lambda name: torch.randn(sd["encoder.layers.0." + name].shape, generator=g))
        )
        dst = f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([get(f"self_attn.{p}_proj.{part}") for p in "qkv"])
            out[dst + f"attn.out_proj.{part}"] = get(f"self_attn.out_proj.{part}")
            out[dst + f"ln_1.{part}"] = get(f"layer_norm1.{part}")
            out[dst + f"ln_2.{part}"] = get(f"layer_norm2.{part}")
            out[dst + f"mlp.c_fc.{part}"] = get(f"mlp.fc1.{part}")
            out[dst + f"mlp.c_proj.{part}"] = get(f"mlp.fc2.{part}")
    return out


def write_checkpoint(
    path,
    kind: str,
    dtype: torch.dtype = torch.float32,
    vocab: int = CLIP_VOCAB,
    metadata: dict[str, str] | None = None,
    seed: int = 0,
) -> dict:
    """Write a tiny ``kind`` ("sd1" | "sd2" | "sdxl") single file; returns {"unet", "vae", "text_encoders"}
    (the float32 modules it was made from)."""
    vae = tiny_ldm_vae(seed, 0.13025 if kind == "sdxl" else 0.18215)
    if kind == "sd1":
        encoders = [tiny_ldm_clip(32, vocab=vocab, seed=seed)]
        state = clip_to_ldm(encoders[0], "cond_stage_model.transformer.")
        unet = tiny_ldm_unet("sd1", 32, seed=seed)
    elif kind == "sd2":
        encoders = [tiny_ldm_clip(64, projection=True, vocab=vocab, seed=seed, hidden_act="gelu")]
        state = clip_to_open_clip(encoders[0], "cond_stage_model.model.", extra_layer=True)
        encoders[0] = _without_projection(encoders[0])
        unet = tiny_ldm_unet("sd2", 64, seed=seed)
    else:
        encoders = [
            tiny_ldm_clip(32, vocab=vocab, seed=seed),
            tiny_ldm_clip(32, projection=True, vocab=vocab, seed=seed + 1, hidden_act="gelu"),
        ]
        state = {
            **clip_to_ldm(encoders[0], "conditioner.embedders.0.transformer."),
            **clip_to_open_clip(encoders[1], "conditioner.embedders.1.model."),
        }
        unet = tiny_ldm_unet("sdxl", 64, pooled=32, seed=seed)
    state.update(unet_to_ldm(unet))
    state.update(vae_to_ldm(vae))
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state, "global_step": 1}, str(path))
    return {"unet": unet, "vae": vae, "text_encoders": encoders}


def _without_projection(te):
    """The CLIPTextModel (no projection) that SD 2 uses, with ``te``'s weights."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(te.config).eval()
    state = {
        k.removeprefix("text_model."): v for k, v in te.state_dict().items() if not k.startswith("text_projection")
    }
    model.load_state_dict(state)
    return model


def save_tiny_tokenizer(cache_dir, names: tuple[str, ...]) -> str:
    """Save the tests' tiny tokenizer under ``cache_dir/<name>`` (kohya's tokenizer cache layout)."""
    from tests.tiny_models import tiny_tokenizer

    for name in names:
        tiny_tokenizer().save_pretrained(os.path.join(str(cache_dir), name))
    return str(cache_dir)
