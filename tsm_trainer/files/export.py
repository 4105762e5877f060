"""Plain-LoRA views of a native TSM file (docs/design.md section 5): one standard kohya LoRA per
expert, the static text-encoder LoRA, and exact or SVD-truncated merges of experts
(DeMe-style: decouple by timestep, then merge in parameter space).

Everything here works on ``{key: tensor}`` dicts; tools/ adds the file handling.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

import torch

from tsm_trainer.core.intervals import interval_timestep_range
from tsm_trainer.core.lora_math import EXPERT_KEY, PLAIN_KEY, experts_in, lora_delta, module_names

MERGE_WEIGHTINGS = ("uniform", "interval")


def text_encoder_lora(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The static (shared) text-encoder LoRA: plain kohya keys of ``lora_te*`` modules."""
    return {k: v for k, v in tensors.items() if k.startswith("lora_te")}


def expert_lora(tensors: Mapping[str, torch.Tensor], n: int, e: int) -> dict[str, torch.Tensor]:
    """Expert e of scale n as a plain kohya LoRA of the denoiser (``tsm.{n}.{e}.`` stripped).

    Raises:
        KeyError: the expert is not in the tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = EXPERT_KEY.match(key)
        if m and int(m["n"]) == n and int(m["e"]) == e:
            out[f"{m['module']}.{m['part']}.weight"] = value
    if not out:
        raise KeyError(f"expert {e} of scale {n} is not in the file (it holds {experts_in(tensors)})")
    for name in module_names(out):
        if f"{name}.alpha" not in tensors:
            raise ValueError(f"key {name + '.alpha'!r} is missing (every module of a TSM file has one alpha)")
        out[f"{name}.alpha"] = tensors[f"{name}.alpha"]
    return out


def plain_lora_as_tsm(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain kohya LoRA as the tensors of a fostered n = 1 native file (the inverse of
    :func:`expert_lora` for n = 1): denoiser pairs become expert 0 of scale 1, text-encoder pairs
    and alphas keep their keys. The caller adds the ``tsm.*`` metadata (scales [1], stage foster).

    Raises:
        ValueError: a key that is not a kohya LoRA key (``{name}.lora_down.weight``,
            ``{name}.lora_up.weight``, ``{name}.alpha``), e.g. a LoHa/LoKr or DoRA file.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in lora.items():
        m = PLAIN_KEY.match(key)
        if m is None:
            raise ValueError(f"key {key!r} is not a kohya LoRA key (only lora_down/lora_up/alpha are supported)")
        name, part = m["name"], m["part"]
        out[key if part == "alpha" or name.startswith("lora_te") else f"{name}.tsm.1.0.{part}"] = value
    return out


def fold_alpha(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold alpha/r into lora_up and write alpha = r: the same deltas, scale 1 everywhere.

    For loaders that apply one alpha to every module (diffusers/PEFT).
    """
    out = dict(lora)
    for name in module_names(lora):
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else float(rank)
        out[f"{name}.lora_up.weight"] = (up.float() * (alpha / rank)).to(up.dtype)
        out[f"{name}.alpha"] = torch.tensor(float(rank), dtype=lora.get(f"{name}.alpha", down).dtype)
    return out


def merge_weights(
    n: int, experts: Sequence[int], weighting: str | Sequence[float], num_train_timesteps: int = 1000
) -> list[float]:
    """Per-expert weights of a merge: ``uniform`` (1/k), ``interval`` (share of the integer
    timesteps each expert covers), or given numbers (used as they are)."""
    if not experts:
        raise ValueError(f"no experts of scale {n} to merge")
    if isinstance(weighting, str):
        if weighting == "uniform":
            return [1.0 / len(experts)] * len(experts)
        if weighting == "interval":
            lengths = [hi - lo for lo, hi in (interval_timestep_range(e, n, num_train_timesteps) for e in experts)]
            return [length / sum(lengths) for length in lengths]
        raise ValueError(f"merge weighting must be one of {MERGE_WEIGHTINGS} or a list of numbers, got {weighting!r}")
    try:
        weights = [float(w) for w in weighting]
    except ValueError as e:
        raise ValueError(f"merge weights must be numbers ({e})") from None
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} weights given for {len(experts)} experts {list(experts)}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"merge weights must be finite numbers, got {weights}")
    return weights


def merge_experts(
    tensors: Mapping[str, torch.Tensor], n: int, weights: Sequence[float], experts: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """One plain LoRA of the denoiser whose delta is exactly ``sum_e w_e * (alpha/r) B_e A_e``
    per module.

    Exact by concatenating factors: down = cat(w_e (alpha/r) A_e) (sum r x k), up = cat(B_e)
    (d x sum r), alpha = rank sum (scale 1). The text-encoder LoRA is not part of it: it has
    no experts, so it stays as it is (:func:`text_encoder_lora`).
    """
    experts = list(experts if experts is not None else experts_in(tensors).get(n, []))
    if not experts:
        raise ValueError(f"no expert of scale {n} in the file (it holds {experts_in(tensors)})")
    parts = [expert_lora(tensors, n, e) for e in experts]
    out: dict[str, torch.Tensor] = {}
    for name in module_names(parts[0]):
        downs, ups = [], []
        for w, part in zip(weights, parts):
            down, up = part[f"{name}.lora_down.weight"].float(), part[f"{name}.lora_up.weight"].float()
            scale = float(part[f"{name}.alpha"]) / down.shape[0]
            downs.append(down * (w * scale))
            ups.append(up)
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def svd_truncate(lora: Mapping[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], float]:
    """Best rank-``rank`` approximation of every module's delta (Eckart-Young), alpha = rank.

    Returns the LoRA and the relative Frobenius error over all modules,
    ``sqrt(sum ||D - D_r||^2) / sqrt(sum ||D||^2)``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out: dict[str, torch.Tensor] = {}
    err2 = total2 = 0.0
    for name in module_names(lora):
        delta = lora_delta(lora, name)
        shape = delta.shape
        mat = delta.flatten(1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        up = u[:, :r] * root
        down = root[:, None] * vh[:r]
        err2 += float(s[r:].pow(2).sum())
        total2 += float(s.pow(2).sum())
        if len(shape) == 4:
            down = down.reshape(r, *shape[1:])
            up = up.reshape(shape[0], r, 1, 1)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r))
    return out, (err2**0.5) / max(total2**0.5, 1e-30)


def kohya_to_peft(
    lora: Mapping[str, torch.Tensor], index: Mapping[str, tuple[int, str, object]], component_names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """A plain kohya LoRA as a diffusers/PEFT state dict that ``pipe.load_lora_weights`` reads.

    Keys become ``{component}.{module path}.lora_A.weight`` / ``lora_B.weight`` with alpha/r
    folded into lora_B (PEFT then applies scale 1).

    Args:
        index: :func:`tsm_trainer.core.targets.lora_name_index` of the base model.
        component_names: the pipeline's attribute names, denoiser first (``unet`` or
            ``transformer``), then its text encoders in index order (``text_encoder``, ...).
    Raises:
        ValueError: a LoRA module that is not in the model, named.
    """
    folded = fold_alpha(lora)
    out: dict[str, torch.Tensor] = {}
    for name in module_names(folded):
        if name not in index:
            raise ValueError(f"key {name + '.lora_down.weight'!r}: module {name!r} is not in the base model")
        component, path, _ = index[name]
        prefix = f"{component_names[0 if component < 0 else component + 1]}.{path}"
        out[f"{prefix}.lora_A.weight"] = folded[f"{name}.lora_down.weight"]
        out[f"{prefix}.lora_B.weight"] = folded[f"{name}.lora_up.weight"]
    return out


def peft_to_kohya(
    peft: Mapping[str, torch.Tensor],
    index: Mapping[str, tuple[int, str, object]],
    component_names: Sequence[str],
    alphas: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`kohya_to_peft`: kohya names (alpha = rank unless ``alphas`` gives
    a PEFT ``lora_alpha`` per module path)."""
    by_path = {(component_names[0 if c < 0 else c + 1], path): name for name, (c, path, _) in index.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in peft.items():
        m = re.match(
            r"^(?:base_model\.model\.)?(?P<component>[^.]+)\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$",
            key,
        )
        if not m:
            raise ValueError(f"key {key!r} is not a PEFT LoRA key (<component>.<module>.lora_A/lora_B.weight)")
        name = by_path.get((m["component"], m["path"]))
        if name is None:
            raise ValueError(f"key {key!r}: module {m['component']}.{m['path']} is not in the base model")
        out[f"{name}.{'lora_down' if m['ab'] == 'A' else 'lora_up'}.weight"] = value
        if m["ab"] == "A":
            rank = value.shape[0]
            alpha = (alphas or {}).get(f"{m['component']}.{m['path']}", float(rank))
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def plain_metadata(
    source: Mapping[str, str], title: str, output_name: str, lora: Mapping[str, torch.Tensor], alpha_folded: bool
) -> dict[str, str]:
    """Metadata of a plain LoRA written from a TSM file: the source's ss_*/modelspec.* without
    TSM-only keys, ``ss_network_dim`` the largest rank, ``ss_network_alpha`` the alpha the
    tensors hold (the rank when alpha is folded) and ``tsm.alpha_folded``."""
    keep = {
        k: v
        for k, v in source.items()
        if k.startswith(("ss_", "modelspec.")) and k not in ("ss_network_args", "modelspec.timestep_range")
    }
    rank = max(v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight"))
    alphas = {float(v) for k, v in lora.items() if k.endswith(".alpha")}
    keep.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_args": "{}",
            "ss_output_name": output_name,
            "modelspec.title": title,
            "tsm.alpha_folded": json.dumps(alpha_folded),
        }
    )
    if alpha_folded:
        keep["ss_network_alpha"] = str(rank)
    elif len(alphas) == 1:
        keep["ss_network_alpha"] = str(alphas.pop())
    return keep


def write_expert_files(
    path: str, out_dir: str, scales: Sequence[int] | None = None, fold: bool = False, name: str | None = None
) -> list[dict]:
    """Write one plain kohya LoRA per expert (denoiser only) and one static text-encoder LoRA.

    Expert files carry ``modelspec.timestep_range = "lo,hi"`` (hi exclusive), ``tsm.expert =
    "e/n"``, a unique ``ss_output_name`` and ``modelspec.title`` and their own sshs hashes.
    Static and expert tensors never share a file (Forge rejects mixed files).

    Returns:
        one record per file written: path, kind ("expert" | "text_encoder"), n, e, lo, hi.
    """
    import os

    from tsm_trainer.core.file_format import TSMFileError, check_not_an_input, load_file, save_file_atomic
    from tsm_trainer.core.tensor_checks import check_tsm_file

    tensors, metadata = load_file(path)
    info = check_tsm_file(tensors, metadata, path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    title = metadata.get("modelspec.title", name)
    available = experts_in(tensors)
    scales = list(scales) if scales else list(available)
    files = []  # (path, tensors, metadata, record): everything is checked before the first write
    for n in scales:
        if n not in available:
            raise TSMFileError(f"{path}: no experts of scale {n} (it holds {available})")
        for e in available[n]:
            lora = expert_lora(tensors, n, e)
            if fold:
                lora = fold_alpha(lora)
            lo, hi = interval_timestep_range(e, n, info["num_train_timesteps"])
            stem = f"{name}_e{e}of{n}"
            meta = plain_metadata(metadata, f"{title} expert {e}/{n} t[{lo},{hi})", stem, lora, fold)
            meta.update(
                {
                    "modelspec.timestep_range": f"{lo},{hi}",
                    "tsm.expert": f"{e}/{n}",
                    "tsm.source": os.path.basename(path),
                }
            )
            record = {"kind": "expert", "n": n, "e": e, "lo": lo, "hi": hi}
            files.append((os.path.join(out_dir, stem + ".safetensors"), lora, meta, record))
    te = text_encoder_lora(tensors)
    if te:
        if fold:
            te = fold_alpha(te)
        stem = f"{name}_te"
        meta = plain_metadata(metadata, f"{title} text encoder", stem, te, fold)
        meta["tsm.source"] = os.path.basename(path)
        record = {"kind": "text_encoder", "n": None, "e": None, "lo": None, "hi": None}
        files.append((os.path.join(out_dir, stem + ".safetensors"), te, meta, record))
    for out, *_ in files:
        check_not_an_input(out, [path], "--out_dir/--name")
    written = []
    for out, lora, meta, record in files:
        save_file_atomic(lora, out, meta)
        written.append({"path": out, **record})
    return written
