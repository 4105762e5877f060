"""diffusers / transformers configs of a single-file checkpoint, read from its tensor shapes.

Channels, levels, layers per block, transformer depths, context and text widths, vocabulary
and layer counts all come from the shapes, so a small checkpoint in the real key layout loads
as well as a full-size one. What shapes cannot show (attention heads, norm groups, activation,
scaling factor) comes from the shipped full-size settings (``configs/<family>.json``): heads are
``width // head_width`` (64 in every SD text encoder and in the SD 2 / SDXL UNets) or SD 1's
fixed 8 UNet heads.
"""

from __future__ import annotations

from typing import Any

from tsm_trainer.base_models.loading import BaseModelError
from tsm_trainer.base_models.single_file.layout import UNET, VAE

Shapes = dict[str, tuple[int, ...]]


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted integers n of keys ``prefix + "n." ...``."""
    out = {k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return sorted(int(n) for n in out if n.isdigit())


def _shape(shapes: Shapes, key: str, path: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BaseModelError(f"{path}: key '{key}' is missing (an incomplete or unusual checkpoint)")
    return shapes[key]


def _heads(width: int, settings: dict, what: str, path: str) -> int:
    heads = settings.get("attention_heads") or max(1, width // settings["head_width"])
    if width % heads:
        raise BaseModelError(f"{path}: {what} width {width} is not divisible by its {heads} attention heads")
    return heads


def unet_config(
    shapes: Shapes, settings: dict, path: str, pooled_dim: int | None = None, v_prediction: bool = False
) -> dict[str, Any]:
    """UNet2DConditionModel config of the ``model.diffusion_model.*`` UNet (SD 1/2, or SDXL when
    ``label_emb`` is present; ``pooled_dim`` is then text encoder 2's projection width)."""
    conv_in = _shape(shapes, UNET + "input_blocks.0.0.weight", path)
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (resnet out channels, transformer depth)
    for i in _indices(shapes, UNET + "input_blocks.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in shapes:
            levels.append([])
            continue
        out = _shape(shapes, block + "0.out_layers.3.weight", path)[0]
        levels[-1].append((out, len(_indices(shapes, block + "1.transformer_blocks."))))
    if {len(level) for level in levels} != {len(levels[0])} or not levels[0]:
        raise BaseModelError(
            f"{path}: UNet levels hold different numbers of res blocks "
            f"({[len(level) for level in levels]}); not an SD UNet layout"
        )
    channels = [level[0][0] for level in levels]
    depths = [level[0][1] for level in levels]
    if any({d for _, d in level} != {level[0][1]} for level in levels):
        raise BaseModelError(f"{path}: transformer depth varies inside a UNet level; not an SD UNet layout")
    mid_depth = len(_indices(shapes, UNET + "middle_block.1.transformer_blocks."))
    if depths[-1] and depths[-1] != mid_depth:
        raise BaseModelError(
            f"{path}: the middle block has {mid_depth} transformer layers, the last level "
            f"{depths[-1]}; diffusers' UNet needs them equal"
        )
    layers_per_level = [d or 1 for d in depths[:-1]] + [mid_depth or 1]
    to_k = next((k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise BaseModelError(f"{path}: the UNet has no cross-attention (no '...attn2.to_k.weight' key)")
    proj_in = next(k for k in shapes if k.startswith(UNET) and k.endswith("proj_in.weight"))
    heads = [_heads(c, settings, f"UNet level {i}", path) for i, c in enumerate(channels)]
    config: dict[str, Any] = {
        "sample_size": settings["sample_size"],
        "in_channels": conv_in[1],
        "out_channels": _shape(shapes, UNET + "out.2.weight", path)[0],
        "block_out_channels": channels,
        "layers_per_block": len(levels[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "cross_attention_dim": shapes[to_k][1],
        "transformer_layers_per_block": layers_per_level,
        "attention_head_dim": heads[0] if settings.get("attention_heads") else heads,
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "norm_num_groups": settings["norm_num_groups"],
        "norm_eps": settings["norm_eps"],
        "upcast_attention": bool(
            settings.get("upcast_attention") or (settings.get("upcast_attention_if_v") and v_prediction)
        ),
    }
    time_dim = _shape(shapes, UNET + "time_embed.0.weight", path)[0]
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    if UNET + "label_emb.0.0.weight" in shapes:  # SDXL: pooled text embedding + 6 size/crop numbers
        adm_in = shapes[UNET + "label_emb.0.0.weight"][1]
        if pooled_dim is None or (adm_in - pooled_dim) % 6 or adm_in <= pooled_dim:
            raise BaseModelError(
                f"{path}: label_emb takes {adm_in} inputs, which is not text encoder 2's pooled "
                f"width {pooled_dim} plus 6 time embeddings"
            )
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(adm_in - pooled_dim) // 6,
            projection_class_embeddings_input_dim=adm_in,
        )
    return config


def vae_config(shapes: Shapes, settings: dict, path: str) -> dict[str, Any]:
    """AutoencoderKL config of the ``first_stage_model.*`` VAE."""
    conv_in = _shape(shapes, VAE + "encoder.conv_in.weight", path)
    levels = _indices(shapes, VAE + "encoder.down.")
    channels = [_shape(shapes, f"{VAE}encoder.down.{i}.block.0.conv1.weight", path)[0] for i in levels]
    return {
        "in_channels": conv_in[1],
        "out_channels": _shape(shapes, VAE + "decoder.conv_out.weight", path)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, VAE + "encoder.down.0.block.")),
        "latent_channels": _shape(shapes, VAE + "decoder.conv_in.weight", path)[1],
        "use_quant_conv": VAE + "quant_conv.weight" in shapes,
        "use_post_quant_conv": VAE + "post_quant_conv.weight" in shapes,
        **{
            k: settings[k]
            for k in ("norm_num_groups", "sample_size", "scaling_factor", "force_upcast")
            if k in settings
        },
    }


def text_encoder_config(shapes: Shapes, settings: dict, path: str) -> dict[str, Any]:
    """CLIPTextConfig keyword arguments of one text encoder (HF ``clip`` or ``open_clip`` layout)."""
    p = settings["prefix"]
    if settings["layout"] == "clip":
        vocab, width = _shape(shapes, p + "text_model.embeddings.token_embedding.weight", path)
        positions = _shape(shapes, p + "text_model.embeddings.position_embedding.weight", path)[0]
        layers = len(_indices(shapes, p + "text_model.encoder.layers."))
        inner = _shape(shapes, p + "text_model.encoder.layers.0.mlp.fc1.weight", path)[0]
        projection = width
    else:
        vocab, width = _shape(shapes, p + "token_embedding.weight", path)
        positions = _shape(shapes, p + "positional_embedding", path)[0]
        layers = len(_indices(shapes, p + "transformer.resblocks."))
        inner = _shape(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight", path)[0]
        projection = shapes[p + "text_projection"][1] if p + "text_projection" in shapes else width
        if settings.get("projection") and p + "text_projection" not in shapes:
            raise BaseModelError(f"{path}: key '{p}text_projection' is missing (text encoder 2's pooled projection)")
        if settings.get("drop_last_layer"):
            layers -= 1
    if layers < 1:
        raise BaseModelError(f"{path}: the text encoder under '{p}' has no usable layers")
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": _heads(width, settings, f"text encoder '{p}'", path),
        "max_position_embeddings": positions,
        "projection_dim": projection,
        **{k: settings[k] for k in ("hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")},
    }
