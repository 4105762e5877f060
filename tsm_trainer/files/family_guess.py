"""Which model family a LoRA file is for: from ``modelspec.architecture``, then
``ss_base_model_version``, then its key names (used by :mod:`tsm_trainer.files.inspection`)."""

from __future__ import annotations

from typing import Any

from tsm_trainer.families import family_specs


def guess_family(metadata: dict[str, str], modules: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """``{"name": ..., "source": ...}``: from ``modelspec.architecture``, ``ss_base_model_version``,
    then key names. ``name`` may be ``"sd1 or sd2"``, ``"sd3 or flux"`` or ``"unknown"``.

    ``modules`` is ``{module name: {"prefix", "down", "shapes", ...}}`` as the inspection parses it."""
    arch = metadata.get("modelspec.architecture")
    if arch:
        name = _family_from_text(arch, "modelspec_architecture")
        if name:
            return {"name": name, "source": f"modelspec.architecture={arch}"}
    version = metadata.get("ss_base_model_version")
    if version:
        name = _family_from_text(version, "base_model_version")
        if name:
            return {"name": name, "source": f"ss_base_model_version={version}"}
    if modules:
        name, why = _family_from_keys(modules)
        return {"name": name, "source": f"key names ({why})"}
    return {"name": "unknown", "source": "no metadata, no keys"}


def _family_from_text(value: str, attribute: str) -> str | None:
    """Exact match of a spec's string, else the first spec (registry order) with a needle in ``value``."""
    specs = family_specs()
    for f in specs:
        if getattr(f, attribute) == value:
            return f.name
    v = value.lower()
    return next((f.name for f in specs for needle in f.metadata_needles if needle in v), None)


def _family_from_keys(modules: dict[str, dict[str, Any]]) -> tuple[str, str]:
    names = ["_" + n.replace(".", "_") for n in modules]
    prefixes = {m["prefix"] for m in modules.values()}

    def has(*needles):
        return next((nd for nd in needles if any(nd in n for n in names)), None)

    if has("_double_blocks_", "_single_blocks_", "_single_transformer_blocks_"):
        return "flux", has("_double_blocks_", "_single_blocks_", "_single_transformer_blocks_").strip("_")
    if has("_joint_blocks_"):
        return "sd3", "joint_blocks"
    if has("_temp_attentions_", "_transformer_in_"):
        return "video", "temporal attention"
    if "lora_te3" in prefixes and "lora_te2" not in prefixes and "lora_te1" in prefixes:
        return "flux", "lora_te1 + lora_te3"
    if "lora_te3" in prefixes or "text_encoder_3" in prefixes:
        return "sd3", "third text encoder"
    if has("_input_blocks_", "_output_blocks_", "_middle_block_"):
        return "sdxl", "SGM names input_blocks/output_blocks"
    if "lora_te2" in prefixes or "text_encoder_2" in prefixes:
        return "sdxl", "second text encoder (lora_te2)"
    if prefixes & {"lora_transformer", "transformer"}:
        if has("_attn2_"):
            return "pixart", "transformer with cross-attention attn2"
        return "sd3 or flux", "diffusers transformer names"
    if prefixes & {"lora_unet", "unet"}:
        for name, m in modules.items():
            if name.replace(".", "_").endswith("attn2_to_k") and m["down"]:
                in_dim = m["shapes"][next(iter(m["down"].values()))][1]
                guess = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(in_dim)
                if guess:
                    return guess, f"cross-attention width {in_dim}"
        return "sd1 or sd2", "UNet with diffusers names"
    return "unknown", "no known prefix"
