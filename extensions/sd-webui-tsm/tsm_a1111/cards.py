"""What the "TSM" extra-networks card shows, from a file's metadata (no tensors are read)."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata
from tsm_trainer.core.intervals import interval_timestep_range


def card_description(metadata: Mapping[str, str], path: str = "<file>") -> str:
    """One line for the card: stage, scales, the core scale's intervals, base model, rank."""
    try:
        info = check_tsm_metadata(metadata, path)
    except TSMFileError as e:
        return f"not a usable TSM file: {e}"
    scales = info["scales"]
    n, T = scales[0], info["num_train_timesteps"]
    parts = [f"TSM {info['stage']}", "scales " + ",".join(map(str, scales))]
    if info["stage"] == "assemble":
        parts.append(f"{info['mixture']} mixture, routed")
    if info["interval"] is not None:
        lo, hi = interval_timestep_range(info["interval"], n, T)
        parts.append(f"expert {info['interval']} only: t in [{lo}, {hi})")
    else:
        bounds = [interval_timestep_range(i, n, T) for i in range(n)]
        parts.append(f"{n} expert(s): " + " ".join(f"[{lo},{hi})" for lo, hi in bounds))
    if info["timestep_space"] == "flow":
        parts.append("flow (t = sigma*T)")
    base = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    if base:
        parts.append(str(base))
    if metadata.get("ss_network_dim"):
        parts.append(f"rank {metadata['ss_network_dim']}")
    return "; ".join(parts)


def card_item_fields(name: str, metadata: Mapping[str, str], path: str, default_multiplier: str = "1.0") -> dict:
    """The TSM-specific fields of an ``ExtraNetworksPage.create_item`` dict (the page adds previews,
    sort keys and search terms). ``prompt`` is JS, as A1111 expects (``quote_js`` equivalent)."""
    return {
        "name": name,
        "filename": path,
        "description": html.escape(card_description(metadata, path)),
        "metadata": dict(metadata),
        "prompt": json.dumps(f"<tsm:{name}:") + " + " + default_multiplier + " + " + json.dumps(">"),
    }
