"""Bake a LoRA (one TSM expert, or a merged LoRA) into a base model's weights.

``W <- W + multiplier * (alpha/r) * B A`` for every module the LoRA names, written as a new
diffusers pipeline folder or a new single-file checkpoint. The result is a plain model any UI
loads, with the LoRA's effect fixed at one expert: bake the expert of the noise levels that
matter most, or a merge of the experts (``export.merge_experts``) for an all-round model.

Un-baking subtracts the same deltas (``unbake_from_models``, or baking again with
``multiplier=-multiplier``). That restores the base weights to within float rounding (one
rounding per bake in the weights' dtype; about 1e-7 relative in float32, 1e-3 in float16):
keep the original model when you need it bit for bit.

Only torch, safetensors and tsm_trainer are imported at module level; diffusers is imported
inside :func:`bake_diffusers_folder`. Only safetensors is read (never pickle).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tsm_trainer.base_models.loading import DENOISER_COMPONENTS, TEXT_ENCODER_COMPONENTS
from tsm_trainer.core.atomic_write import atomic_folder
from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata, load_file, save_file_atomic
from tsm_trainer.core.key_names import diffusers_lora_name_to_sgm
from tsm_trainer.core.lora_math import PLAIN_KEY, experts_in, pair_delta
from tsm_trainer.core.targets import layers_by_lora_name
from tsm_trainer.families import family_specs
from tsm_trainer.families.base import FamilySpec


class BakeError(ValueError):
    """A LoRA that does not fit the base model, or an output that can't be written."""


# -- LoRA tensors -> deltas -------------------------------------------------------------------
def lora_pairs(
    tensors: Mapping[str, torch.Tensor], source: str = "LoRA"
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{lora_name: (down, up, alpha/r)}`` of a plain kohya LoRA (alpha missing: alpha = r).

    Raises:
        BakeError: a key that isn't a plain LoRA key (TSM experts, routers, LoHa/LoKr, DoRA ...),
            a module without its down or up weight, or factors whose ranks differ.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = PLAIN_KEY.match(key)
        if m is None:
            hint = (
                " (a native TSM file: pick one expert with expert_lora, or merge the experts first)"
                if ".tsm." in key or ".router." in key
                else ""
            )
            raise BakeError(
                f"{source}: key {key!r} is not a plain kohya LoRA key (.lora_down.weight, "
                f".lora_up.weight, .alpha){hint}"
            )
        parts.setdefault(m["name"], {})[m["part"]] = value
    pairs = {}
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            missing = "lora_down" if "lora_down.weight" not in p else "lora_up"
            raise BakeError(f"{source}: module {name!r} has no {missing}.weight")
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        rank = down.shape[0]
        if up.dim() < 2 or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)) or down.dim() not in (2, 4):
            raise BakeError(
                f"{source}: key {name + '.lora_up.weight'!r} has shape {tuple(up.shape)}, which does not "
                f"fit {name + '.lora_down.weight'!r} of shape {tuple(down.shape)}"
            )
        alpha = float(p["alpha"]) if "alpha" in p else float(rank)
        if alpha == 0:
            alpha = float(rank)  # kohya: alpha 0 / None means alpha = rank
        pairs[name] = (down, up, alpha / rank)
    return pairs


def fit_delta(delta: torch.Tensor, shape: Sequence[int], name: str, target: str, source: str) -> torch.Tensor:
    """``delta`` viewed as ``shape``: equal, or differing only by trailing 1x1 dims (a Linear LoRA on
    a 1x1 conv or the other way round, as kohya allows)."""
    shape = tuple(shape)
    if tuple(delta.shape) == shape:
        return delta
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    if squeeze(tuple(delta.shape)) == squeeze(shape):
        return delta.reshape(shape)
    raise BakeError(
        f"{source}: key {name + '.lora_down.weight'!r} gives a delta of shape {tuple(delta.shape)}, "
        f"but {target} has shape {shape} (a LoRA for another base model?)"
    )


def lora_deltas(
    tensors: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], source: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """``{lora_name: (alpha/r) B A}`` (float32, shaped like the module's weight) of a plain kohya LoRA.

    Args:
        tensors: ``{name}.lora_down.weight``, ``{name}.lora_up.weight``, optional ``{name}.alpha``.
        layers: ``{lora_name: Linear or Conv2d}``, e.g. from :func:`tsm_trainer.core.targets.layers_by_lora_name`.
        source: the file name, for error messages.
    Raises:
        BakeError: naming the key and the file, for a name that is not in ``layers`` or a shape
            that does not fit.
    """
    deltas = {}
    pairs = lora_pairs(tensors, source)
    unknown = sorted(name for name in pairs if name not in layers)
    if unknown:
        raise BakeError(
            f"{source}: {len(unknown)} module(s) are not in the base model (a LoRA for another base "
            f"model?), e.g. key {unknown[0] + '.lora_down.weight'!r}; others: {unknown[1:4]}"
        )
    for name, (down, up, scale) in pairs.items():
        weight = layers[name].weight
        deltas[name] = fit_delta(
            pair_delta(down.float(), up.float(), scale), weight.shape, name, f"the model's {name}", source
        )
    return deltas


def expert_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], n: int, e: int, source: str = "TSM file"
) -> dict[str, torch.Tensor]:
    """Expert e of scale n of a native TSM file as a plain kohya LoRA, with the file's (static)
    text-encoder LoRA. Routers are dropped: in an assembled file this is the core-only model.

    Thin wrapper over :func:`tsm_trainer.files.export.expert_lora` that checks the file is a TSM file.

    Raises:
        TSMFileError: not a TSM file, or the expert is not in it (the message lists those it holds).
    """
    from tsm_trainer.files.export import expert_lora as _expert_lora
    from tsm_trainer.files.export import text_encoder_lora

    check_tsm_metadata(metadata, source)
    try:
        plain = _expert_lora(tensors, n, e)
    except KeyError:
        raise TSMFileError(
            f"{source}: expert {e} of scale {n} is not in the file; it holds {describe_experts(experts_in(tensors))}"
        ) from None
    return {**text_encoder_lora(tensors), **plain}


def describe_experts(experts: Mapping[int, Sequence[int]]) -> str:
    """``scale 8: experts 0-7; scale 1: expert 0`` for messages."""
    parts = []
    for n, es in experts.items():
        es = list(es)
        if es == list(range(es[0], es[-1] + 1)) and len(es) > 1:
            parts.append(f"scale {n}: experts {es[0]}-{es[-1]}")
        else:
            parts.append(f"scale {n}: expert{'s' if len(es) > 1 else ''} {', '.join(map(str, es))}")
    return "; ".join(parts) or "no experts"


# -- in-memory models ---------------------------------------------------------------------------
def _add_deltas(deltas: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module], multiplier: float) -> None:
    with torch.no_grad():
        for name, delta in deltas.items():
            w = layers[name].weight
            w.copy_((w.float() + multiplier * delta.to(w.device)).to(w.dtype))


def bake_into_models(
    tensors: Mapping[str, torch.Tensor],
    denoiser: nn.Module | None,
    text_encoders: Sequence[nn.Module | None] = (),
    multiplier: float = 1.0,
    source: str = "LoRA",
) -> list[str]:
    """Add ``multiplier * (alpha/r) B A`` of every module of a plain kohya LoRA to the models' weights,
    in place (accumulated in float32, stored in each weight's dtype). Returns the names baked.

    ``text_encoders`` are positional as in the pipeline (``[text_encoder, text_encoder_2, ...]``;
    None keeps a position): they decide the ``lora_te``/``lora_te1``/... prefixes. Every delta is
    checked before any weight changes.
    """
    layers = layers_by_lora_name(denoiser, list(text_encoders))
    deltas = lora_deltas(tensors, layers, source)
    _add_deltas(deltas, layers, multiplier)
    return sorted(deltas)


def unbake_from_models(
    tensors: Mapping[str, torch.Tensor],
    denoiser: nn.Module | None,
    text_encoders: Sequence[nn.Module | None] = (),
    multiplier: float = 1.0,
    source: str = "LoRA",
) -> list[str]:
    """Subtract what :func:`bake_into_models` added (same LoRA, same multiplier).

    Restores the weights to within float rounding, not bit for bit: exact restoration needs the
    original model file.
    """
    return bake_into_models(tensors, denoiser, text_encoders, -multiplier, source)


# -- diffusers pipeline folders ---------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_dtypes(folder: str, variant: str | None = None) -> dict[str, torch.dtype]:
    """``{component: dtype}``: the most common float dtype of each component's safetensors weights
    (of ``variant``'s files when given), so a float16 folder bakes into a float16 folder (diffusers
    would load it as float32)."""
    out = {}
    for component in sorted(os.listdir(folder)):
        sub = os.path.join(folder, component)
        if not os.path.isdir(sub):
            continue
        counts: dict[torch.dtype, int] = {}
        for fname in os.listdir(sub):
            if not fname.endswith(f".{variant}.safetensors" if variant else ".safetensors"):
                continue
            with open(os.path.join(sub, fname), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for key, info in header.items():
                if key != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
                    n = 1
                    for d in info.get("shape", []):
                        n *= d
                    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                    counts[dtype] = counts.get(dtype, 0) + n
        if counts:
            out[component] = max(counts, key=counts.get)
    return out


def pipeline_models(pipe) -> tuple[nn.Module, list[nn.Module | None]]:
    """(denoiser, [text_encoder, text_encoder_2, text_encoder_3] without trailing Nones) of a pipeline."""
    denoiser = next((getattr(pipe, c, None) for c in DENOISER_COMPONENTS if getattr(pipe, c, None) is not None), None)
    if denoiser is None:
        raise BakeError(f"{type(pipe).__name__} has no unet or transformer to bake into")
    encoders = [getattr(pipe, c, None) for c in TEXT_ENCODER_COMPONENTS]
    while encoders and encoders[-1] is None:
        encoders.pop()
    return denoiser, encoders


def bake_diffusers_folder(
    base_folder: str,
    lora_tensors: Mapping[str, torch.Tensor],
    out_folder: str,
    multiplier: float = 1.0,
    overwrite: bool = False,
    source: str = "LoRA",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> list[str]:
    """Bake a plain kohya LoRA into a local diffusers pipeline folder and write a new folder.

    Loads with ``DiffusionPipeline.from_pretrained(base_folder, local_files_only=True)`` (SD1/2,
    SDXL, SD3, Flux, PixArt ...), keeps each component's stored dtype unless ``dtype`` is given,
    bakes into the ``unet``/``transformer`` and ``text_encoder``/``_2``/``_3``, saves into a temp
    folder next to ``out_folder`` and renames it into place: a crash leaves no half-written
    folder. An existing ``out_folder`` is an error unless ``overwrite``; then it is renamed aside
    and deleted only after the new one is in place. Returns the module names baked.
    """
    from diffusers import DiffusionPipeline

    base_folder, out_folder = os.path.abspath(base_folder), os.path.abspath(out_folder.rstrip("/\\") or out_folder)
    if not os.path.isfile(os.path.join(base_folder, "model_index.json")):
        raise BakeError(f"{base_folder}: not a diffusers pipeline folder (no model_index.json)")
    _check_output(out_folder, base_folder, overwrite, folder=True)
    if dtype is None:
        dtype = stored_dtypes(base_folder, variant) or None
    pipe = DiffusionPipeline.from_pretrained(base_folder, local_files_only=True, dtype=dtype, variant=variant)
    denoiser, encoders = pipeline_models(pipe)
    baked = bake_into_models(lora_tensors, denoiser, encoders, multiplier, source)

    with atomic_folder(out_folder, prefix=".tmp-bake-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, variant=variant)
    return baked


def _check_output(out: str, base: str, overwrite: bool, folder: bool) -> None:
    if os.path.realpath(out) == os.path.realpath(base):
        raise BakeError(
            f"{out}: the output is the base model itself; write to a new path (the base is the only exact way back)"
        )
    if os.path.lexists(out):
        if not overwrite:
            raise BakeError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
        if folder and not os.path.isdir(out):
            raise BakeError(f"{out}: exists and is not a folder")
        if not folder and os.path.isdir(out):
            raise BakeError(f"{out}: exists and is a folder")


# -- single-file (original layout) checkpoints ------------------------------------------------
UNET_ROOT = "model.diffusion_model."
_OPENCLIP_BLOCK = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
    r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
)
_OPENCLIP_NAMES = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}

# (checkpoint key, which third of a fused q/k/v weight (0, 1, 2) or None for the whole weight)
Target = tuple[str, "int | None"]


def checkpoint_family(keys: Sequence[str]) -> FamilySpec:
    """The family whose text-encoder roots (spec ``checkpoint_roots``) the keys use, in registry order; a
    checkpoint with none of them (UNet only) is taken as the last, most general, such family (SD 1.x)."""
    specs = [spec for spec in family_specs() if spec.checkpoint_roots]
    return next(
        (spec for spec in specs if any(k.startswith(root) for root, _ in spec.checkpoint_roots for k in keys)),
        specs[-1],
    )


def checkpoint_index(keys: Sequence[str]) -> tuple[str, dict[str, Target]]:
    """(family, ``{lora_name: (checkpoint key, q/k/v third or None)}``) of an original-layout checkpoint.

    Names are built from the checkpoint's own keys (``.`` -> ``_``), so no name has to be parsed
    back into a dotted path: UNet ``lora_unet_<SGM path>``; CLIP text encoders
    ``lora_te[1]_text_model_...``; OpenCLIP (SD2, SDXL's second encoder) under the names of the
    transformers CLIP it is converted to, with q/k/v as thirds of the fused ``in_proj_weight``.
    """
    keys = list(keys)
    spec = checkpoint_family(keys)
    family, roots = spec.name, spec.checkpoint_roots
    index: dict[str, Target] = {}
    ambiguous: set[str] = set()

    def add(name: str, target: Target) -> None:
        if name in index and index[name] != target:
            ambiguous.add(name)
        index[name] = target

    for key in keys:
        if key.startswith(UNET_ROOT) and key.endswith(".weight"):
            add("lora_unet_" + key[len(UNET_ROOT) : -len(".weight")].replace(".", "_"), (key, None))
            continue
        for root, prefix in roots:
            if not key.startswith(root):
                continue
            rel = key[len(root) :]
            m = _OPENCLIP_BLOCK.match(rel)
            if m:
                block = f"{prefix}_text_model_encoder_layers_{m[1]}_"
                if m[2] == "attn.in_proj_weight":
                    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # rows: q, then k, then v
                        add(block + "self_attn_" + proj, (key, i))
                else:
                    add(block + _OPENCLIP_NAMES[m[2]], (key, None))
            elif rel.endswith(".weight") and not root.endswith(".model."):
                add(f"{prefix}_{rel[: -len('.weight')].replace('.', '_')}", (key, None))
    for name in ambiguous:
        del index[name]
    return family, index


def bake_single_file(
    checkpoint_path: str,
    lora_tensors: Mapping[str, torch.Tensor],
    out_path: str,
    multiplier: float = 1.0,
    overwrite: bool = False,
    source: str = "LoRA",
    layers_per_block: int | None = None,
    up_blocks_with_attention: frozenset[int] | None = None,
) -> list[str]:
    """Bake a plain kohya LoRA into an SD1/SD2/SDXL original-layout ``.safetensors`` checkpoint.

    UNet LoRA names may be SGM names (SDXL files) or diffusers names (SD1/SD2 files), which are
    translated with the UNet layout (``layers_per_block``, ``up_blocks_with_attention``: by
    default SD's 2 and {1, 2, 3}, SDXL's 2 and {0, 1}). Tensors the LoRA doesn't touch are
    written unchanged, with the checkpoint's metadata, via a temp file and a rename.
    Returns the module names baked.

    Raises:
        TSMFileError: the checkpoint is not a readable safetensors file (a .ckpt is refused).
        BakeError: a LoRA module with no counterpart in the checkpoint (naming key and file), a
            shape that does not fit, or an existing output without ``overwrite``.
    """
    if not str(checkpoint_path).endswith(".safetensors"):
        raise TSMFileError(
            f"{checkpoint_path}: only .safetensors checkpoints are read (a .ckpt/.pt is a pickle, "
            "which can run code when loaded; convert it to .safetensors first)"
        )
    if not str(out_path).endswith(".safetensors"):
        raise BakeError(f"{out_path}: the output must be a .safetensors file")
    _check_output(os.path.abspath(out_path), os.path.abspath(checkpoint_path), overwrite, folder=False)
    tensors, metadata = load_file(checkpoint_path)
    family, index = checkpoint_index(tensors)
    if not any(k.startswith(UNET_ROOT) for k in tensors):
        raise BakeError(
            f"{checkpoint_path}: no '{UNET_ROOT}*' keys: not an SD1/SD2/SDXL original-layout checkpoint "
            "(for a diffusers folder pass the folder)"
        )
    sdxl = family == "sdxl"
    lpb = layers_per_block or 2
    up_attn = (
        up_blocks_with_attention
        if up_blocks_with_attention is not None
        else (frozenset({0, 1}) if sdxl else frozenset({1, 2, 3}))
    )

    pairs = lora_pairs(lora_tensors, source)
    targets: dict[str, Target] = {}
    unknown = []
    for name in pairs:
        target = index.get(name)
        if target is None:
            try:
                target = index.get(diffusers_lora_name_to_sgm(name, lpb, up_attn))
            except ValueError:  # a diffusers-looking name with no SGM counterpart
                pass
        if target is None:
            unknown.append(name)
        else:
            targets[name] = target
    if unknown:
        unknown.sort()
        raise BakeError(
            f"{source}: {len(unknown)} module(s) have no weight in {checkpoint_path} ({family} layout; a "
            f"LoRA for another base model?), e.g. key {unknown[0] + '.lora_down.weight'!r}; "
            f"others: {unknown[1:4]}"
        )
    deltas = {}
    for name, (key, part) in targets.items():
        down, up, scale = pairs[name]
        weight = tensors[key]
        rows = None
        if part is not None:  # q, k or v: a third of the fused in_proj_weight
            third = weight.shape[0] // 3
            rows = slice(part * third, (part + 1) * third)
            shape = (third, *weight.shape[1:])
        else:
            shape = tuple(weight.shape)
        deltas[name] = (
            key,
            rows,
            fit_delta(pair_delta(down.float(), up.float(), scale), shape, name, f"{checkpoint_path}:{key}", source),
        )
    for key, rows, delta in deltas.values():
        weight = tensors[key]
        new = weight.float()  # a copy for half weights; clone float32 ones so the input is never aliased
        if new.data_ptr() == weight.data_ptr():
            new = new.clone()
        if rows is None:
            new += multiplier * delta
        else:
            new[rows] += multiplier * delta
        tensors[key] = new.to(weight.dtype)
    save_file_atomic(tensors, out_path, metadata, add_hashes=False)
    return sorted(deltas)


# -- files ---------------------------------------------------------------------------------------
def load_lora_for_bake(
    path: str, expert: int | None = None, scale: int | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """(plain kohya LoRA tensors, description) of a LoRA file; for a native TSM file, of one expert.

    Raises:
        TSMFileError: a TSM file without ``expert`` (the message lists the experts), or ``expert``
            given for a plain LoRA.
    """
    from tsm_trainer.core.tensor_checks import check_lora_tensors, check_tsm_file

    tensors, metadata = load_file(path)
    if "tsm.format_version" not in metadata:
        if expert is not None or scale is not None:
            raise TSMFileError(f"{path}: a plain LoRA (no tsm.* metadata) has no experts; drop --expert/--scale")
        check_lora_tensors(tensors, path)
        return tensors, path
    info = check_tsm_file(tensors, metadata, path)
    experts = experts_in(tensors)
    if expert is None:
        raise TSMFileError(
            f"{path}: a native TSM file holds several timestep experts ({describe_experts(experts)}); pick one with "
            "--expert E [--scale N] (scale defaults to the core scale), or merge them into one LoRA first "
            "(tools/merge_experts.py) and bake that"
        )
    n = info["scales"][0] if scale is None else scale
    return expert_lora(tensors, metadata, n, expert, path), f"{path} expert {expert} of scale {n}"
