"""What a training state remembers about its run, and what a resume may change.

The record (saved in ``state.json`` as ``"run"``): every training option, the dataset's
fingerprint (items, files, captions, buckets, repeats; :meth:`TrainDataset.fingerprint`) and the
sha256 of the dataset config file. On resume:

- ``FIXED`` options, the dataset and its config must be equal: they define the network, the
  optimizer state and the data order, so with another value the run would not continue the saved one.
- every other option may change (learning rate, max steps, schedule, save cadence, sampling...):
  it takes effect and the change is printed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

# Option names, before and after the kohya renaming (a name the config lacks is skipped).
FIXED = (
    "seed",
    "family",
    "prediction_type",
    "task",
    "tsm_stage",
    "tsm_scales",
    "tsm_experts",
    "tsm_mixture",
    "tsm_interval",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "network_module",
    "network_args",
    "train_text_encoder",
    "optimizer",
    "optimizer_type",
)
IGNORED = ("resume", "overwrite", "tsm_recipe", "debug")  # how this run starts, not what it trains
DATA = {
    "dataset_fingerprint": "the dataset (images, captions, repeats or buckets)",
    "dataset_config_sha256": "the dataset config file's content",
}


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_identity(dataset, dataset_config: str) -> dict:
    """The data part of the record: the dataset's fingerprint and the config file's hash."""
    identity = {"dataset_fingerprint": dataset.fingerprint()}
    if dataset_config and os.path.isfile(dataset_config):
        identity["dataset_config_sha256"] = file_sha256(dataset_config)
    return identity


def run_record(config, data: dict | None = None) -> dict:
    """{"options": every option except IGNORED (JSON values), **data}."""
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in IGNORED}
    return {"options": options, **(data or {})}


def compare_runs(state_path: str, saved: dict | None, current: dict) -> list[str]:
    """Raise ValueError naming the first fixed option (or the data) that differs between the saved
    and the current record; return one line per changed option that takes effect."""
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        return [
            f"{state_path}: this state records no run options (saved by an older version): the options, seed "
            "and dataset are not checked against it"
        ]
    how = "resume with the saved value, or start a new run without --resume (another --output_name)"
    for key, what in DATA.items():
        if key in saved and key in current and saved[key] != current[key]:
            raise ValueError(
                f"{state_path}: {what} changed since this state was saved; an exact resume is "
                f"impossible: restore it, or start without --resume"
            )
    old, new = saved["options"], current["options"]
    for name in FIXED:
        if name in old and name in new and old[name] != new[name]:
            raise ValueError(
                f"{state_path}: --{name} was {old[name]!r} when this state was saved, now "
                f"{new[name]!r}; it cannot change on resume: {how}"
            )
    return [
        f"resume: --{name} changed from {old[name]!r} to {new[name]!r} (takes effect)"
        for name in sorted(new)
        if name in old and old[name] != new[name]
    ]
