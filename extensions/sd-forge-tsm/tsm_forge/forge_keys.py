"""Forge's own LoRA key map of a diffusion model, for TSM files with diffusers names (imports Forge lazily)."""

from __future__ import annotations


def unet_key_map(kmodel) -> dict:
    """``{lora name: "diffusion_model.<path>.weight" | (key, (dim, offset, size)) | (key, piece, fn)}``.

    Forge's ``backend.patcher.lora.model_lora_keys_unet`` (Flux: diffusers ``lora_transformer_...`` names
    onto its fused layers), plus SD3's diffusers names, which that map leaves commented out at dfdcbab,
    from Forge's bundled ``packages_3rdparty.comfyui_lora_collection.utils.mmdit_to_diffusers``.
    """
    from backend.patcher.lora import model_lora_keys_unet

    key_map = model_lora_keys_unet(kmodel, {})
    blocks = getattr(kmodel.diffusion_model, "joint_blocks", None)
    if blocks is not None:
        from packages_3rdparty.comfyui_lora_collection.utils import mmdit_to_diffusers

        for k, to in mmdit_to_diffusers({"depth": len(blocks)}, output_prefix="diffusion_model.").items():
            if k.endswith(".weight"):
                key_map.setdefault("lora_transformer_" + k[: -len(".weight")].replace(".", "_"), to)
    return key_map
