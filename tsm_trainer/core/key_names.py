"""kohya LoRA names (docs/design.md section 4): ``prefix + "_" + module_path.replace(".", "_")``.

SDXL files use the SGM (original LDM) module names that A1111, ComfyUI and sd-scripts'
``sdxl_original_unet`` use, so a diffusers SDXL UNet's paths are translated first.
"""

from __future__ import annotations

import re

PREFIX_UNET = "lora_unet"
PREFIX_TRANSFORMER = "lora_transformer"
PREFIX_TEXT_ENCODER = "lora_te"  # SD1/SD2; SDXL/SD3 use lora_te1, lora_te2, lora_te3


def lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def diffusers_unet_to_sgm(
    path: str, layers_per_block: int = 2, up_blocks_with_attention: frozenset[int] = frozenset({0, 1})
) -> str:
    """Translate a diffusers SDXL UNet module path to its SGM name.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``. Input block k holds down block
    ``(k-1) // (L+1)``; output block k holds up block ``k // (L+1)`` (L = layers_per_block).

    Args:
        path: module path in the diffusers UNet, or a parameter path (``...conv.weight``).
        layers_per_block: the UNet's ``layers_per_block`` (2 for SDXL).
        up_blocks_with_attention: indices of up blocks that have attentions, which decides
            whether an upsampler is the block's 2nd or 3rd layer.
    Raises:
        ValueError: for a path with no SGM counterpart.
    """
    L = layers_per_block
    for src, dst in _TOP_LEVEL.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src) :]
    m = re.match(
        r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", path
    )
    if m:
        kind, block, part, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        if kind == "down_blocks":
            if part == "downsamplers":
                head = f"input_blocks.{(L + 1) * (block + 1)}.0"
                rest = "op" + rest[len("conv") :] if rest == "conv" or rest.startswith("conv.") else rest
            else:
                head = f"input_blocks.{(L + 1) * block + idx + 1}.{0 if part == 'resnets' else 1}"
        else:
            if part == "upsamplers":
                layer = 2 if block in up_blocks_with_attention else 1
                head = f"output_blocks.{(L + 1) * block + L}.{layer}"
            else:
                head = f"output_blocks.{(L + 1) * block + idx}.{0 if part == 'resnets' else 1}"
        return _join(head, _resnet_rest(rest) if part == "resnets" else rest)
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if m:
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if part == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * idx}", _resnet_rest(rest))
    raise ValueError(f"no SGM name for diffusers SDXL UNet module {path!r}")


def _resnet_rest(rest: str) -> str:
    first, _, tail = rest.partition(".")
    return _join(_RESNET_PARTS.get(first, first), tail)


def _join(head: str, rest: str) -> str:
    return f"{head}.{rest}" if rest else head


def diffusers_lora_name_to_sgm(
    name: str, layers_per_block: int = 2, up_blocks_with_attention: frozenset[int] = frozenset({1, 2, 3})
) -> str:
    """``lora_unet_down_blocks_1_attentions_0_...`` (SD1/SD2 files) -> ``lora_unet_input_blocks_4_1_...``.

    UIs hold the UNet in the original (SGM/LDM) layout. Defaults are SD1/SD2's (up blocks
    1-3 have attentions). A name with no diffusers block head is returned unchanged.
    """
    if not name.startswith(PREFIX_UNET + "_"):
        return name
    body = name[len(PREFIX_UNET) + 1 :]
    patterns = (
        r"((?:down|up)_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)$",
        r"(mid_block)_(resnets|attentions)_(\d+)_(.+)$",
        r"(time_embedding|add_embedding)_(linear_\d)$",
        r"(conv_in|conv_out)$",
    )
    for pattern in patterns:
        m = re.match(pattern, body)
        if m:
            dotted = ".".join(m.groups())  # the tail stays one segment: only the head is translated
            sgm = diffusers_unet_to_sgm(dotted, layers_per_block, up_blocks_with_attention)
            return lora_name(PREFIX_UNET, sgm)
    return name
