"""The held-out images of a kohya dataset config, as fixed evaluation batches."""

from __future__ import annotations

from tsm_trainer.data import TrainDataset, load_dataset_config, scan_dataset


def heldout_batches(dataset_config: str, validation_split: float = 0.0, seed: int = 0, log=print) -> list[dict]:
    """{"pixels", "captions"} batches of the images the trainer holds out with the same
    ``--validation_split`` and ``--seed`` (0: every image of the config, e.g. a held-out set of its own).
    Unreadable images and missing captions are reported and skipped."""
    from tsm_trainer.training.build import split_validation

    scan = scan_dataset(load_dataset_config(dataset_config), on_error="skip")
    for problem in scan.problems:
        log(f"skipped: {problem}")
    _, held = split_validation(scan, validation_split)
    held = held or scan
    data = TrainDataset(held, seed=seed + 1, shuffle=False)
    if not len(data):
        raise ValueError(f"{dataset_config}: no held-out image to evaluate on")
    return [data.batch(0, i) for i in range(len(data))]
