"""Metadata written into every file: ``tsm.*`` (docs/design.md section 4), kohya's ``ss_*`` and
``modelspec.*`` (Stability's sai_model_spec 1.0.1), so UIs and sd-scripts tools read it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence

from tsm_trainer.core.file_format import FORMAT_VERSION
from tsm_trainer.families.base import FamilySpec

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION = "https://github.com/tsm-trainer/tsm-trainer"


def tsm_metadata(
    scales: list[int],
    stage: str,
    mixture: str,
    num_train_timesteps: int,
    timestep_space: str,
    interval: int | None = None,
) -> dict[str, str]:
    meta = {
        "tsm.format_version": FORMAT_VERSION,
        "tsm.scales": json.dumps(list(scales)),
        "tsm.num_train_timesteps": str(num_train_timesteps),
        "tsm.timestep_space": timestep_space,
        "tsm.stage": stage,
        "tsm.mixture": mixture,
    }
    if interval is not None:
        meta["tsm.interval"] = str(interval)
    return meta


def kohya_metadata(
    family: FamilySpec, network_module: str, rank: int, alpha: float, network_args: Mapping[str, str], output_name: str
) -> dict[str, str]:
    """The ``ss_*`` keys sd-scripts writes and readers (A1111, Civitai, kohya tools) expect."""
    return {
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(dict(network_args)),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": str(family.v2),
        "ss_output_name": output_name,
    }


def modelspec_metadata(
    family: FamilySpec,
    title: str,
    prediction_type: str | None = None,
    resolution: int | Sequence[int] | None = None,
    timestep_range: tuple[int, int] | None = None,
) -> dict[str, str]:
    """``modelspec.*``. ``resolution``: the training resolution, one side or (width, height);
    None only when it is unknown (the family's native size is written then)."""
    if resolution is None:
        resolution = family.resolution
    width, height = (resolution, resolution) if isinstance(resolution, (int, float)) else tuple(resolution)
    if prediction_type is None:
        prediction_type = "v" if family.v2 else ("rectified_flow" if family.timestep_space == "flow" else "epsilon")
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{int(width)}x{int(height)}",
        "modelspec.prediction_type": prediction_type,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    if timestep_range is not None:
        meta["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    return meta
