"""Data layer of the standalone trainer: kohya dataset TOML -> scanned items -> batches by (epoch, index).

Typical use::

    cfg = load_dataset_config("dataset_configs/images_buckets.toml", defaults={"resolution": 512})
    # or kohya's folders: folder_dataset_config("train/", reg_data_dir="reg/", resolution=512, batch_size=2)
    scan = scan_dataset(cfg, on_error="skip")        # decodes every file now; raises DatasetError if empty
    ds = TrainDataset(scan, seed=42, latent_cache=LatentCache(vae_encode, cache_dir=None, namespace=vae_id))
    ds.cache_latents()                               # optional pre-pass, then the VAE may be freed
    for batch in ds.epoch_batches(epoch): ...       # lazy; batch i depends only on (seed, epoch, i)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tsm_trainer.data.buckets import BucketChoice, BucketSelector, make_bucket_resolutions
from tsm_trainer.data.cache import LatentCache, TextEncoderCache
from tsm_trainer.data.captions import process_caption, read_caption_file
from tsm_trainer.data.config import (
    DataConfig,
    DatasetConfig,
    SubsetConfig,
    load_dataset_config,
    parse_dataset_config,
    write_dataset_config,
)
from tsm_trainer.data.dataset import TrainDataset, item_repeats
from tsm_trainer.data.errors import DatasetConfigError, DatasetError
from tsm_trainer.data.folders import concept_folder_params, folder_dataset_config
from tsm_trainer.data.images import IMAGE_EXTENSIONS
from tsm_trainer.data.scan import Item, Problem, ScanResult, scan_dataset


def build_dataset(
    config: str | Path | DataConfig,
    seed: int = 0,
    on_error: Literal["skip", "raise"] = "skip",
    defaults: Mapping[str, Any] | None = None,
    latent_cache: LatentCache | None = None,
) -> TrainDataset:
    """load_dataset_config + scan_dataset + TrainDataset in one call."""
    cfg = config if isinstance(config, DataConfig) else load_dataset_config(config, defaults)
    return TrainDataset(scan_dataset(cfg, on_error=on_error), seed=seed, latent_cache=latent_cache)


__all__ = [
    "BucketChoice",
    "BucketSelector",
    "DataConfig",
    "DatasetConfig",
    "DatasetConfigError",
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "Item",
    "LatentCache",
    "Problem",
    "ScanResult",
    "SubsetConfig",
    "TextEncoderCache",
    "TrainDataset",
    "build_dataset",
    "concept_folder_params",
    "folder_dataset_config",
    "item_repeats",
    "load_dataset_config",
    "make_bucket_resolutions",
    "parse_dataset_config",
    "process_caption",
    "read_caption_file",
    "scan_dataset",
    "write_dataset_config",
]
