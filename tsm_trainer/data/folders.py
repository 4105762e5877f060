"""kohya's folder datasets (``--train_data_dir`` / ``--reg_data_dir``) as a :class:`DataConfig`.

Layout, as sd-scripts reads it (``config_util.generate_dreambooth_subsets_config_by_subdirs``)::

    train_data_dir/10_sks cat/   -> a subset: num_repeats 10, class_tokens "sks cat"
    train_data_dir/1_dog/        -> num_repeats 1, class_tokens "dog"
    reg_data_dir/1_cat/          -> the same, with is_reg = true

The number before the first ``_`` is the repeat count; the rest of the name is the caption of
every image in that folder without a caption file. Sub-folders whose name does not start with a
positive integer are skipped with a warning naming them (kohya skips them too). Reg repeats are
balanced against the training images by :class:`TrainDataset`, as kohya does for any dataset.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tsm_trainer.data.config import DataConfig, parse_dataset_config
from tsm_trainer.data.errors import DatasetConfigError
from tsm_trainer.data.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


def concept_folder_params(name: str) -> tuple[int, str] | None:
    """(num_repeats, class_tokens) of a folder named ``N_concept``; None unless N is an integer >= 1.

    ``"10_sks cat"`` -> (10, "sks cat"); ``"3_a_b"`` -> (3, "a_b"); ``"5"`` -> (5, "").
    """
    head, _, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return (repeats, rest) if repeats >= 1 else None


def _concept_subsets(base: str | Path, is_reg: bool, flag: str) -> list[dict[str, Any]]:
    base = Path(base)
    if not base.is_dir():
        raise DatasetConfigError(
            f"{flag} {base}: not a folder (kohya layout: {base}/<repeats>_<concept>/ "
            "holding the images, e.g. 10_sks cat)"
        )
    subsets, skipped = [], []
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        params = concept_folder_params(sub.name)
        if params is None:
            skipped.append(sub.name)
            continue
        subsets.append({"image_dir": str(sub), "num_repeats": params[0], "class_tokens": params[1], "is_reg": is_reg})
    if skipped:
        logger.warning(
            "%s %s: skipping sub-folder(s) whose name does not start with a repeat count >= 1 "
            "(<repeats>_<concept>): %s",
            flag,
            base,
            ", ".join(skipped),
        )
    loose = [p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not subsets:
        found = f"; it holds {len(loose)} image(s) directly, which kohya does not read" if loose else ""
        raise DatasetConfigError(
            f"{flag} {base}: no <repeats>_<concept> sub-folder (e.g. 10_sks cat){found}; "
            "move the images into such a folder, or give a --dataset_config TOML"
        )
    if loose:
        logger.warning(
            "%s %s: %d image(s) directly in the folder are not used (only <repeats>_<concept> sub-folders are read)",
            flag,
            base,
            len(loose),
        )
    return subsets


def _resolution(value: Any) -> Any:
    """kohya's --resolution string "512" / "768,512" -> 512 / [768, 512]; other values as given."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, str):
        try:
            parts = [int(p) for p in value.split(",")]
        except ValueError:
            raise DatasetConfigError(
                f"--resolution {value!r}: expected SIZE or WIDTH,HEIGHT in pixels, e.g. 512 or 768,512"
            ) from None
        if len(parts) not in (1, 2):
            raise DatasetConfigError(f"--resolution {value!r}: expected SIZE or WIDTH,HEIGHT, e.g. 512 or 768,512")
        return parts[0] if len(parts) == 1 else parts
    return value


def folder_dataset_config(
    train_data_dir: str | Path,
    reg_data_dir: str | Path | None = None,
    *,
    resolution: int | str | tuple[int, int] | list[int],
    batch_size: int = 1,
    caption_extension: str = ".caption",
    enable_bucket: bool = False,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
    bucket_no_upscale: bool = False,
    shuffle_caption: bool = False,
    keep_tokens: int = 0,
    **subset_options: Any,
) -> DataConfig:
    """The :class:`DataConfig` kohya builds from ``--train_data_dir`` (and ``--reg_data_dir``).

    One dataset; one subset per ``N_concept`` sub-folder (training folders first, then reg
    folders, each sorted by name). The keyword arguments are kohya's command-line values and
    mean what the dataset TOML keys of the same name mean: ``resolution`` is an int, (width, height),
    or kohya's command-line string ("512" or "768,512" = width,height); ``caption_extension`` gets a
    leading dot if it has none (as in kohya).
    ``subset_options`` takes any other subset-level TOML key (``caption_dropout_rate``,
    ``flip_aug``, ``keep_tokens_separator``, ``caption_prefix``, ...); a value of None means
    kohya's default. Unknown keys and bad values raise :class:`DatasetConfigError` naming them.

    Raises:
        DatasetConfigError: a folder is missing or holds no ``N_concept`` sub-folder, or an
            option is invalid; the message names the flag and folder or the key.
    """
    subsets = _concept_subsets(train_data_dir, False, "--train_data_dir")
    if reg_data_dir is not None:
        subsets += _concept_subsets(reg_data_dir, True, "--reg_data_dir")
    general = dict(
        resolution=_resolution(resolution),
        batch_size=batch_size,
        caption_extension=caption_extension,
        enable_bucket=enable_bucket,
        min_bucket_reso=min_bucket_reso,
        max_bucket_reso=max_bucket_reso,
        bucket_reso_steps=bucket_reso_steps,
        bucket_no_upscale=bucket_no_upscale,
        shuffle_caption=shuffle_caption,
        keep_tokens=keep_tokens,
        **subset_options,
    )
    general = {k: v for k, v in general.items() if v is not None}
    for key in ("image_dir", "num_repeats", "class_tokens", "is_reg"):
        if key in general:
            raise DatasetConfigError(
                f"folder dataset: option '{key}' comes from the folder names "
                "(<repeats>_<concept>, --reg_data_dir); use a --dataset_config TOML to set it"
            )
    source = f"--train_data_dir {train_data_dir}"
    cfg = parse_dataset_config({"general": general, "datasets": [{"subsets": subsets}]}, file=source)
    (dataset,) = cfg.datasets
    named = tuple(
        dataclasses.replace(s, where=f"{'--reg_data_dir' if s.is_reg else '--train_data_dir'} folder {s.image_dir}")
        for s in dataset.subsets
    )
    return dataclasses.replace(cfg, datasets=(dataclasses.replace(dataset, where=source, subsets=named),))
