"""Inspect any LoRA or TSM ``.safetensors`` file, and check it against a base model.

Reads native TSM files (docs/design.md section 4), plain kohya LoRAs and the per-expert exports
(section 5), and diffusers/PEFT LoRAs (``unet....to_q.lora_A.weight``). No UI or trainer is
imported. Base models come from :mod:`tsm_trainer.base_models.loading` (the meta-device skeleton is
enough for :func:`check_against_model`: it compares names and shapes, never values).

    summary = summarize("tsm8.safetensors")
    print(format_summary(summary))
    reasons = check_against_model("tsm8.safetensors", *load_base_model("models/sd15"))  # base_model
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata, load_file, sshs_hashes, tensor_data_sha256
from tsm_trainer.core.intervals import interval_timestep_range
from tsm_trainer.core.lora_math import EXPERT_KEY
from tsm_trainer.core.targets import layers_by_lora_name
from tsm_trainer.files.family_guess import guess_family

KIND_LABELS = {"tsm": "native TSM file", "kohya": "kohya LoRA", "peft": "diffusers/PEFT LoRA", "unknown": "unknown"}

# kohya: "{lora_name}.{rest}" with lora_name "lora_<prefix>_<path>"
_KOHYA_KEY = re.compile(r"^(lora_[A-Za-z0-9_]+?)\.(.+)$")
_KOHYA_PREFIX = re.compile(r"^(lora_(?:unet|transformer|te\d?|prior_unet))_")
# PEFT / diffusers: "{module.path}.lora_A.weight" (also the older ".lora.down.weight" forms)
_PEFT_KEY = re.compile(
    r"^(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(?:\.[A-Za-z0-9_]+)?\.weight$"
)
_PEFT_DOWN = ("lora_A", "lora.down", "lora_linear_layer.down")


# ----------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------
def summarize(path: str) -> dict[str, Any]:
    """Everything a person wants to know about a LoRA file, as a JSON-serialisable dict.

    Keys: path, file_size, kind (tsm | kohya | peft | unknown), family {name, source},
    modules {prefix: count}, num_modules, ranks {rank: modules}, alphas {alpha: modules},
    dtypes {dtype: tensors}, num_tensors, num_parameters, tsm (native files: scales, stage,
    mixture, num_train_timesteps, timestep_space, interval, router, experts per scale with
    their ``[lo, hi)``), expert (an exported expert: index, scale, timestep_range), hashes,
    metadata {ss, modelspec, tsm, other}, non_finite (keys), problems (what is wrong with
    the file on its own, each naming the key and the file).

    Raises:
        TSMFileError: the file is missing, not ``.safetensors`` or unreadable (truncated...).
    """
    tensors, metadata = load_file(path)
    return _summarize(path, tensors, metadata)


def _summarize(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    problems: list[str] = []
    kind = _detect_kind(tensors, metadata)
    modules = _parse_modules(kind, tensors)
    s: dict[str, Any] = {
        "path": path,
        "file_size": os.path.getsize(path),
        "kind": kind,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors.values()).most_common()),
    }
    if kind == "unknown":
        problems.append(
            f"{path}: no LoRA key recognised (neither kohya 'lora_*.lora_down.weight', TSM "
            f"'.tsm.n.e.lora_down.weight' nor PEFT '.lora_A.weight'), e.g. {sorted(tensors)[:3]}"
        )

    # modules, ranks, alphas
    per_prefix = Counter(m["prefix"] for m in modules.values())
    s["modules"] = dict(sorted(per_prefix.items()))
    s["num_modules"] = len(modules)
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    for name, m in modules.items():
        problems.extend(_module_problems(path, name, m))
        if m["rank"] is not None:
            ranks[m["rank"]] += 1
        if m["alpha"] is not None:
            alphas[m["alpha"]] += 1
    s["ranks"] = dict(sorted(ranks.items()))
    s["alphas"] = dict(sorted(alphas.items()))
    s["family"] = guess_family(metadata, modules)

    # TSM structure
    if kind == "tsm":
        s["tsm"] = _tsm_info(path, metadata, modules, problems)
    expert = _exported_expert(path, metadata, problems)
    if expert is not None:
        s["expert"] = expert

    # hashes
    s["hashes"] = _hashes(path, tensors, metadata)
    if s["hashes"]["model_hash_match"] is False:
        problems.append(
            f"{path}: metadata 'sshs_model_hash' {s['hashes']['sshs_model_hash']} does not match the "
            f"tensor data (sha256 {s['hashes']['computed_model_hash']}): tensors changed after saving?"
        )

    s["non_finite"] = sorted(
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t.float()).all())
    )
    for k in s["non_finite"]:
        problems.append(f"{path}: key {k!r} holds non-finite values (NaN or inf)")

    groups: dict[str, dict[str, str]] = {"ss": {}, "modelspec": {}, "tsm": {}, "other": {}}
    for k, v in sorted(metadata.items()):
        group = "ss" if k.startswith("ss_") else k.split(".", 1)[0] if k.startswith(("modelspec.", "tsm.")) else "other"
        groups[group][k] = v
    s["metadata"] = groups
    s["problems"] = problems
    return s


def _detect_kind(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    if "tsm.format_version" in metadata or any(".tsm." in k for k in tensors):
        return "tsm"
    if any(_KOHYA_KEY.match(k) and k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight") for k in tensors):
        return "kohya"
    if any(_PEFT_KEY.match(k) for k in tensors):
        return "peft"
    return "unknown"


def _new_module(prefix: str) -> dict[str, Any]:
    return {"prefix": prefix, "down": {}, "up": {}, "alpha": None, "rank": None, "router": [], "other": []}


def _parse_modules(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """{module name: {prefix, down {expert: key}, up {expert: key}, alpha, rank, router, other, shapes}}.

    ``expert`` is ``(n, e)`` for TSM expert tensors and ``None`` for a plain LoRA pair.
    """
    modules: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        if kind == "peft":
            m = _PEFT_KEY.match(key)
            if not m:
                name, _, rest = key.rpartition(".")
                if rest == "alpha" and name:
                    mod = modules.setdefault(name, _new_module(name.split(".", 1)[0]))
                    mod["alpha"] = _alpha(t)
                continue
            name = m.group(1)
            mod = modules.setdefault(name, _new_module(name.split(".", 1)[0] if "." in name else "model"))
            mod["down" if m.group(2) in _PEFT_DOWN else "up"][None] = key
            continue
        m = _KOHYA_KEY.match(key)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        pm = _KOHYA_PREFIX.match(name)
        prefix = pm.group(1) if pm else "_".join(name.split("_")[:2])
        mod = modules.setdefault(name, _new_module(prefix))
        tm = EXPERT_KEY.match(key)
        if tm:
            mod["down" if tm["part"] == "lora_down" else "up"][(int(tm["n"]), int(tm["e"]))] = key
        elif rest in ("lora_down.weight", "lora_up.weight"):
            mod["down" if rest == "lora_down.weight" else "up"][None] = key
        elif rest == "alpha":
            mod["alpha"] = _alpha(t)
        elif rest.startswith("router."):
            mod["router"].append(key)
        else:
            mod["other"].append(key)
    for mod in modules.values():
        down_ranks = {int(tensors[k].shape[0]) for k in mod["down"].values() if tensors[k].dim() >= 1}
        mod["ranks"] = down_ranks
        mod["rank"] = min(down_ranks) if len(down_ranks) == 1 else (max(down_ranks) if down_ranks else None)
        mod["shapes"] = {k: tuple(tensors[k].shape) for k in [*mod["down"].values(), *mod["up"].values()]}
    return modules


def _alpha(t: torch.Tensor) -> float | None:
    if t.numel() != 1:
        return None
    v = float(t.float().reshape(()))
    return int(v) if v.is_integer() else v


def _module_problems(path: str, name: str, m: dict[str, Any]) -> list[str]:
    problems = []
    for expert, down_key in m["down"].items():
        up_key = m["up"].get(expert)
        if up_key is None:
            problems.append(f"{path}: key {down_key!r} has no matching up weight")
            continue
        down, up = m["shapes"][down_key], m["shapes"][up_key]
        if len(up) < 2 or len(down) < 1 or up[1] != down[0]:
            problems.append(
                f"{path}: key {up_key!r} has shape {up}, which does not match the rank {down[0] if down else '?'} "
                f"of {down_key!r}"
            )
    for expert, up_key in m["up"].items():
        if expert not in m["down"]:
            problems.append(f"{path}: key {up_key!r} has no matching down weight")
    if len(m["ranks"]) > 1:
        problems.append(f"{path}: module {name!r} mixes ranks {sorted(m['ranks'])} across its experts")
    for key in m["other"]:
        problems.append(f"{path}: key {key!r} is not a LoRA key this tool understands (LyCORIS / DoRA?)")
    return problems


def _tsm_info(path: str, metadata: dict[str, str], modules: dict[str, dict[str, Any]], problems: list[str]) -> dict:
    info: dict[str, Any] = {}
    try:
        info.update(check_tsm_metadata(metadata, path))
    except TSMFileError as e:
        problems.append(str(e))
    T = info.get("num_train_timesteps") or 1000
    present: dict[int, set[int]] = {}
    for m in modules.values():
        for expert in m["down"]:
            if expert is not None:
                present.setdefault(expert[0], set()).add(expert[1])
    scales = info.get("scales") or sorted(present, reverse=True)
    experts = []
    for n in sorted(
        set(scales) | set(present), key=lambda n: (n not in scales, scales.index(n) if n in scales else -n)
    ):
        found = sorted(present.get(n, ()))
        rows = []
        for e in found:
            try:
                lo, hi = interval_timestep_range(e, n, T)
                rows.append({"index": e, "interval": [lo, hi]})
            except ValueError as err:
                problems.append(f"{path}: expert keys '.tsm.{n}.{e}.': {err}")
        experts.append({"scale": n, "count": len(found), "experts": rows})
        if n not in scales:
            problems.append(f"{path}: keys '.tsm.{n}.*' belong to scale {n}, which is not in tsm.scales={scales}")
        elif info.get("interval") is not None and n == scales[0]:
            if found != [info["interval"]]:
                problems.append(f"{path}: tsm.interval={info['interval']} but scale {n} holds experts {found}")
        elif found != list(range(n)):
            missing = sorted(set(range(n)) - set(found))
            problems.append(f"{path}: scale {n} misses expert(s) {missing} (keys '.tsm.{n}.<e>.lora_down.weight')")
    info["experts"] = experts
    routed = [name for name, m in modules.items() if m["router"]]
    info["router"] = bool(routed)
    info["router_modules"] = len(routed)
    if info.get("stage") == "foster" and routed:
        problems.append(f"{path}: tsm.stage=foster but {routed[0]!r} has router keys")
    if info.get("stage") == "assemble":
        denoiser = [name for name, m in modules.items() if any(x is not None for x in m["down"])]
        missing = [name for name in denoiser if not modules[name]["router"]]
        if missing:
            problems.append(
                f"{path}: tsm.stage=assemble but key {missing[0] + '.router.fc.weight'!r} is missing "
                f"({len(missing)} module(s) without router)"
            )
    return info


def _exported_expert(path: str, metadata: dict[str, str], problems: list[str]) -> dict | None:
    """``tsm.expert = "e/n"`` and ``modelspec.timestep_range = "lo,hi"`` of a per-expert export."""
    spec, rng = metadata.get("tsm.expert"), metadata.get("modelspec.timestep_range")
    if spec is None and rng is None:
        return None
    out: dict[str, Any] = {}
    T = int(metadata.get("tsm.num_train_timesteps", 1000) or 1000)
    if rng is not None:
        try:
            lo, hi = (int(float(v)) for v in rng.split(","))
            out["timestep_range"] = [lo, hi]
        except ValueError:
            problems.append(f"{path}: metadata 'modelspec.timestep_range' {rng!r} is not 'lo,hi'")
    if spec is not None:
        try:
            e, n = (int(v) for v in spec.split("/"))
            out.update(index=e, scale=n, expected_range=list(interval_timestep_range(e, n, T)))
        except ValueError as err:
            problems.append(f"{path}: metadata 'tsm.expert' {spec!r} is not 'e/n' ({err})")
    if "timestep_range" in out and "expected_range" in out and out["timestep_range"] != out["expected_range"]:
        problems.append(
            f"{path}: metadata 'modelspec.timestep_range' {rng!r} is not the interval of expert "
            f"{spec} ({out['expected_range'][0]},{out['expected_range'][1]})"
        )
    return out


def _hashes(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    stored, stored_legacy = metadata.get("sshs_model_hash"), metadata.get("sshs_legacy_hash")
    computed = tensor_data_sha256(path)
    h = {
        "sshs_model_hash": stored,
        "computed_model_hash": computed,
        "model_hash_match": None if stored is None else stored.lower() == computed,
    }
    h["sshs_legacy_hash"] = stored_legacy
    if stored_legacy is not None:
        # The legacy hash depends on the ss_* metadata too; informative only.
        legacy = sshs_hashes(tensors, metadata)[1]
        h["computed_legacy_hash"] = legacy
        h["legacy_hash_match"] = stored_legacy.lower() == legacy
    return h


# ----------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------
def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ({v} module{'s' if v != 1 else ''})" for k, v in d.items()) or "-"


def format_summary(summary: dict[str, Any], max_value_chars: int = 100) -> str:
    """A readable multi-line text of :func:`summarize`'s result."""
    s = summary
    lines = [
        f"{s['path']}",
        f"  kind:        {KIND_LABELS.get(s['kind'], s['kind'])}",
        f"  family:      {s['family']['name']}   (from {s['family']['source']})",
        f"  file:        {_size(s['file_size'])}, {s['num_tensors']} tensors, {s['num_parameters']:,} parameters, "
        f"dtype {', '.join(s['dtypes']) or '-'}",
        f"  modules:     {s['num_modules']}: " + (", ".join(f"{p} {c}" for p, c in s["modules"].items()) or "-"),
        f"  ranks:       {_counts(s['ranks'])}",
        f"  alphas:      {_counts(s['alphas'])}",
    ]
    t = s.get("tsm")
    if t is not None:
        lines.append(
            f"  TSM:         stage {t.get('stage', '?')}, scales {t.get('scales', '?')}, "
            + (f"mixture {t.get('mixture', '?')}, " if t.get("stage") != "foster" else "")
            + f"T={t.get('num_train_timesteps', '?')}, "
            f"timestep space {t.get('timestep_space', '?')}"
            + (f", interval {t['interval']}" if t.get("interval") is not None else "")
            + f", router {'yes (' + str(t['router_modules']) + ' modules)' if t['router'] else 'no'}"
        )
        for sc in t["experts"]:
            intervals = "  ".join(f"{x['index']}:[{x['interval'][0]},{x['interval'][1]})" for x in sc["experts"])
            lines.append(f"    scale {sc['scale']}: {sc['count']} expert{'s' if sc['count'] != 1 else ''}  {intervals}")
    e = s.get("expert")
    if e is not None:
        what = f"expert {e['index']} of {e['scale']}" if "index" in e else "expert"
        rng = e.get("timestep_range") or e.get("expected_range")
        lines.append(f"  export:      {what}, timesteps [{rng[0]},{rng[1]})" if rng else f"  export:      {what}")
    h = s["hashes"]
    if h["sshs_model_hash"] is None:
        lines.append(f"  hash:        no sshs_model_hash stored; tensor data sha256 {h['computed_model_hash']}")
    else:
        lines.append(
            f"  hash:        sshs_model_hash {h['sshs_model_hash'][:16]}... "
            + (
                "matches the tensor data"
                if h["model_hash_match"]
                else f"DOES NOT MATCH the tensor data ({h['computed_model_hash'][:16]}...)"
            )
        )
    if h.get("sshs_legacy_hash") is not None:
        lines.append(
            f"               sshs_legacy_hash {h['sshs_legacy_hash']} "
            + (
                "matches"
                if h["legacy_hash_match"]
                else f"differs (recomputed {h['computed_legacy_hash']}; it also covers ss_* metadata)"
            )
        )
    meta = [
        (k, v)
        for group in ("modelspec", "tsm", "ss", "other")
        for k, v in s["metadata"][group].items()
        if not k.startswith("sshs_")
    ]
    lines.append("  metadata:" + ("" if meta else "    none"))
    for k, v in meta:
        v = v.replace("\n", " ")
        if len(v) > max_value_chars:
            v = v[:max_value_chars] + f"... ({len(v)} chars)"
        lines.append(f"    {k} = {v}")
    if s["problems"]:
        lines.append(f"  problems:    {len(s['problems'])}")
        lines.extend(f"    - {p}" for p in s["problems"])
    else:
        lines.append("  problems:    none")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# check against a base model
# ----------------------------------------------------------------------------------------
def check_against_model(
    path: str, denoiser: nn.Module | None, text_encoders: Sequence[nn.Module | None] = ()
) -> list[str]:
    """The reasons ``path`` does not fit the model (empty: it fits). Each reason names the file
    and, where there is one, the key.

    TSM files are loaded with :meth:`TSMNetwork.from_file` (its strict validation); kohya and
    PEFT files are resolved module by module and their shapes compared with the layers. Both
    also report non-finite tensors and a stored ``sshs_model_hash`` that doesn't match.

    Raises:
        TSMFileError: the file is unreadable.
    """
    tensors, metadata = load_file(path)
    summary = _summarize(path, tensors, metadata)
    reasons = list(summary["problems"])
    text_encoders = list(text_encoders)
    kind = summary["kind"]
    if kind == "tsm":
        from tsm_trainer.core.network import TSMNetwork  # the network imports the module wrappers; keep summarize light

        if denoiser is None:
            reasons.append(f"{path}: a TSM file needs a denoiser (UNet / transformer) to be checked against")
        else:
            try:
                TSMNetwork.from_file(path, denoiser, text_encoders, tensors=tensors, metadata=metadata)
            except (TSMFileError, ValueError, TypeError) as e:
                msg = str(e)
                reasons.append(msg if msg.startswith(path) else f"{path}: {msg}")
    elif kind in ("kohya", "peft"):
        modules = _parse_modules(kind, tensors)
        if kind == "kohya":
            try:
                index = layers_by_lora_name(denoiser, text_encoders)
            except ValueError as e:
                return reasons + [f"{path}: cannot name this model's layers: {e}"]
            resolve = lambda name, m: index.get(name)  # noqa: E731
        else:
            resolve = _peft_resolver(denoiser, text_encoders)
        unknown = []
        for name, m in modules.items():
            key = next(iter(m["down"].values()), None) or next(iter(m["up"].values()), None) or name
            layer = resolve(name, m)
            if layer is None:
                unknown.append((name, key, m["prefix"]))
                continue
            reasons.extend(_shape_reasons(path, m, layer))
        no_te = [u for u in unknown if not text_encoders and u[2].startswith(("lora_te", "text_encoder"))]
        if no_te:
            reasons.append(
                f"{path}: {len(no_te)} text-encoder module(s), e.g. key {no_te[0][1]!r}, cannot be checked: "
                "the base model has no text encoder"
            )
        for name, key, _ in unknown:
            if (name, key, _) not in no_te:
                reasons.append(
                    f"{path}: key {key!r}: this model has no layer {name!r} (a file for another base model?)"
                )
    return reasons


def _shape_reasons(path: str, m: dict[str, Any], layer: nn.Module) -> list[str]:
    if isinstance(layer, nn.Linear):
        k, d, tail_down, tail_up, what = (
            layer.in_features,
            layer.out_features,
            (),
            (),
            f"Linear({layer.in_features}, {layer.out_features})",
        )
    elif isinstance(layer, nn.Conv2d):
        k, d = layer.in_channels, layer.out_channels
        tail_down, tail_up = tuple(layer.kernel_size), (1, 1)
        what = f"Conv2d({k}, {d}, kernel {tuple(layer.kernel_size)})"
    else:
        key = next(iter(m["down"].values()), "?")
        return [f"{path}: key {key!r}: the layer is a {type(layer).__name__}, not Linear or Conv2d"]
    reasons = []
    for expert, key in m["down"].items():
        shape = m["shapes"][key]
        r = shape[0] if shape else None
        if tuple(shape) != (r, k, *tail_down):
            reasons.append(
                f"{path}: key {key!r} has shape {tuple(shape)}, the layer {what} needs {(r or 'r', k, *tail_down)}"
            )
        up_key = m["up"].get(expert)
        if up_key is not None:
            up = m["shapes"][up_key]
            if tuple(up) != (d, r, *tail_up):
                reasons.append(
                    f"{path}: key {up_key!r} has shape {tuple(up)}, the layer {what} needs {(d, r, *tail_up)}"
                )
    return reasons


def _peft_resolver(denoiser: nn.Module | None, text_encoders: list[nn.Module | None]):
    """Module of a PEFT key path: ``unet.``/``transformer.`` -> denoiser, ``text_encoder[_N].`` -> encoder N."""
    tables: dict[str, dict[str, nn.Module]] = {}

    def table(root):
        if id(root) not in tables:
            tables[id(root)] = dict(root.named_modules())
        return tables[id(root)]

    def resolve(name: str, m) -> nn.Module | None:
        head, _, rest = name.partition(".")
        if head in ("unet", "transformer", "prior"):
            root = denoiser
        elif head.startswith("text_encoder"):
            i = int(head.rsplit("_", 1)[1]) - 1 if head[-1].isdigit() else 0
            root = text_encoders[i] if i < len(text_encoders) else None
        else:
            root, rest = denoiser, (name[len("base_model.model.") :] if name.startswith("base_model.model.") else name)
        if root is None:
            return None
        t = table(root)
        for candidate in (rest, rest[len("text_model.") :] if rest.startswith("text_model.") else "text_model." + rest):
            if candidate in t:
                return t[candidate]
        return None

    return resolve
