"""TrainDataset: batches of a scanned kohya dataset config, by (epoch, index).

A batch is a dict:
  "pixels":  (B, 3, H, W) float32 in [-1, 1], or (B, F, 3, H, W) for video datasets
             (absent when a LatentCache is attached: then "latents" (B, ...) instead)
  "captions": list[str] of B processed captions (shuffle / dropout / wildcards applied)
  "keys":    list[str] of B source paths (image file or clip folder)
  "bucket":  (H, W) of the pixels
  "is_reg":  (B,) bool, True for images of regularisation subsets (``is_reg``, ``--reg_data_dir``):
             the loop weights their loss by ``prior_loss_weight``
  "network_multiplier": float of the dataset, "dataset": int index, "flipped": list[bool]

Randomness (bucket shuffles, batch order, caption shuffle/dropout, flip, random crop) is a pure
function of (seed, epoch, index), so the dataset holds no position: a training state saves the
trainer's (epoch, position) and :func:`fingerprint` (checked on resume by training/run_record.py),
and a resume continues with exactly the batch the uninterrupted run would have used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from tsm_trainer.data.cache import LatentCache
from tsm_trainer.data.captions import process_caption
from tsm_trainer.data.config import DataConfig
from tsm_trainer.data.errors import DatasetConfigError
from tsm_trainer.data.images import crop_offset, load_sample
from tsm_trainer.data.sampler import PlannedBatch, epoch_rng, plan_epoch
from tsm_trainer.data.scan import Item, ScanResult

logger = logging.getLogger(__name__)


def item_repeats(items: list[Item], subsets, where: str = "dataset") -> list[int]:
    """How often each of one dataset's ``items`` appears per epoch, as kohya's DreamBoothDataset counts.

    A training item appears its subset's ``num_repeats`` times. Regularisation items (``is_reg``)
    are balanced to the training count N = sum of training repeats: in order, each reg item is
    taken with its ``num_repeats`` until N is reached (later ones get 0: unused); if the reg
    items fall short, one more repeat is added to each in turn until N is reached.
    """
    repeats = [0 if subsets[it.subset].is_reg else subsets[it.subset].num_repeats for it in items]
    reg = [i for i, it in enumerate(items) if subsets[it.subset].is_reg]
    num_train = sum(repeats)
    if reg and num_train == 0:
        raise DatasetConfigError(
            f"{where}: only regularisation images (is_reg); kohya balances them against "
            "training images, so add a training subset (or set is_reg = false)"
        )
    if reg and sum(subsets[items[i].subset].num_repeats for i in reg) > num_train:
        logger.warning(
            "%s: more regularisation images (with repeats) than training images; some are not used, as in kohya", where
        )
    n, first = 0, True
    while reg and n < num_train:
        for i in reg:
            step = subsets[items[i].subset].num_repeats if first else 1
            repeats[i] += step
            n += step
            if n >= num_train:
                break
        first = False
    return repeats


class TrainDataset:
    def __init__(self, scan: ScanResult, seed: int = 0, shuffle: bool = True, latent_cache: LatentCache | None = None):
        self.config: DataConfig = scan.config
        self.items = scan.items
        self.seed = int(seed)
        self.shuffle = shuffle
        self.latent_cache = latent_cache
        if latent_cache is not None:
            for d in self.config.datasets:
                for s in d.subsets:
                    if s.random_crop:
                        raise DatasetConfigError(
                            f"{s.where}: key 'random_crop' = true cannot be used with latent "
                            "caching (the crop changes every epoch); set it false or "
                            "disable latent caching"
                        )
        self._batch_sizes = [d.batch_size for d in self.config.datasets]
        self._repeats = [
            item_repeats(ds_items, d.subsets, d.where) for ds_items, d in zip(self.items, self.config.datasets)
        ]
        self._plan_cache: tuple[int, list[PlannedBatch]] | None = None

    # ----- plan and identity -------------------------------------------------------------------
    def plan(self, epoch: int) -> list[PlannedBatch]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (
                epoch,
                plan_epoch(self.items, self._batch_sizes, self._repeats, self.seed, epoch, self.shuffle),
            )
        return self._plan_cache[1]

    def __len__(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return len(self.plan(0))

    @property
    def num_samples(self) -> int:
        """Samples per epoch, repeats included."""
        return sum(map(sum, self._repeats))

    def fingerprint(self) -> str:
        """sha256 of what decides the batches, seed aside: every item (files relative to their
        image_dir, their stamps, caption, bucket, subset), batch sizes, repeats and shuffling. Equal
        fingerprints and seeds give equal batches, so a resume checks it (run_record.data_identity)."""
        h = hashlib.sha256(repr((self._batch_sizes, self._repeats, self.shuffle)).encode())
        for d, ds_items in enumerate(self.items):
            for it in ds_items:
                folder = self.config.datasets[d].subsets[it.subset].image_dir  # a moved dataset is the same one
                names = [os.path.relpath(f, folder) for f in it.frames]
                h.update(repr((names, it.stamp, it.caption, it.choice, it.dataset, it.subset)).encode())
        return h.hexdigest()

    def epoch_batches(self, epoch: int) -> EpochBatches:
        """The batches of `epoch` as a lazy sequence: a batch is loaded only when indexed, so a
        resumed run skips to its position without loading the batches before it."""
        return EpochBatches(self, epoch)

    # ----- assembling one batch ----------------------------------------------------------------
    def _sample_rng(self, epoch: int, index: int, j: int) -> np.random.Generator:
        return epoch_rng(self.seed, epoch, 3, index, j)

    def batch(self, epoch: int, index: int) -> dict:
        """Batch `index` of `epoch` (random access)."""
        pb = self.plan(epoch)[index]
        dcfg = self.config.datasets[pb.dataset]
        video = dcfg.video_frames is not None
        items = [self.items[pb.dataset][e] for e in pb.entries]
        captions, flips, offsets = [], [], []
        for j, it in enumerate(items):
            sub = dcfg.subsets[it.subset]
            rng = self._sample_rng(epoch, index, j)
            flips.append(bool(sub.flip_aug and rng.random() < 0.5))
            offsets.append(crop_offset(it.choice, sub.random_crop, rng))
            captions.append(process_caption(it.caption, sub, rng, epoch))

        def pixels(which: list[int]) -> torch.Tensor:
            return torch.stack(
                [load_sample(items[i].frames, video, items[i].choice, offsets[i], flips[i]) for i in which]
            )

        out = {
            "captions": captions,
            "keys": [it.path for it in items],
            "bucket": (pb.bucket[1], pb.bucket[0]),
            "is_reg": torch.tensor([dcfg.subsets[it.subset].is_reg for it in items]),
            "network_multiplier": dcfg.network_multiplier,
            "dataset": pb.dataset,
            "flipped": flips,
        }
        if self.latent_cache is None:
            out["pixels"] = pixels(list(range(len(items))))
        else:
            keys = [
                self.latent_cache.key(it.path, it.stamp, it.choice.bucket, it.choice.resized, offsets[i], flips[i])
                for i, it in enumerate(items)
            ]
            out["latents"] = self.latent_cache.latents(keys, pixels)
        return out

    # ----- cache preparation -------------------------------------------------------------------
    def cache_latents(self, batch_size: int = 8) -> int:
        """Encode every (item, flip) variant missing from the attached LatentCache, grouped by bucket,
        before training (kohya caches both flips when flip_aug). Returns the number encoded."""
        cache = self.latent_cache
        assert cache is not None, "attach a LatentCache first"
        todo: dict[tuple[int, tuple[int, int]], list[tuple[Item, bool]]] = {}
        for d, ds_items in enumerate(self.items):
            for it in ds_items:
                flips = (False, True) if self.config.datasets[d].subsets[it.subset].flip_aug else (False,)
                for f in flips:
                    key = cache.key(
                        it.path, it.stamp, it.choice.bucket, it.choice.resized, crop_offset(it.choice, False, None), f
                    )
                    if key not in cache:
                        todo.setdefault((d, it.choice.bucket), []).append((it, f))
        n = 0
        for (d, _), group in sorted(todo.items()):
            video = self.config.datasets[d].video_frames is not None
            for k in range(0, len(group), batch_size):
                chunk = group[k : k + batch_size]
                offs = [crop_offset(it.choice, False, None) for it, _ in chunk]
                keys = [
                    cache.key(it.path, it.stamp, it.choice.bucket, it.choice.resized, o, f)
                    for (it, f), o in zip(chunk, offs)
                ]
                cache.latents(
                    keys,
                    lambda which: torch.stack(
                        [
                            load_sample(chunk[i][0].frames, video, chunk[i][0].choice, offs[i], chunk[i][1])  # noqa: B023
                            for i in which
                        ]
                    ),
                )
                n += len(chunk)
        return n

    def static_captions(self) -> list[str]:
        """Every caption the text encoder will see, when config.captions_static (for TextEncoderCache.prepare)."""
        if not self.config.captions_static:
            raise ValueError(
                f"{self.config.source}: captions change per step (shuffle_caption, caption dropout, "
                "tag dropout or wildcards), so text-encoder outputs cannot be cached"
            )
        rng = np.random.default_rng(0)  # unused by static processing
        return sorted(
            {
                process_caption(it.caption, self.config.datasets[d].subsets[it.subset], rng)
                for d, ds in enumerate(self.items)
                for it in ds
            }
        )


class EpochBatches(Sequence):
    """The batches of one epoch of a TrainDataset; ``batches[i]`` loads batch i (nothing is preloaded)."""

    def __init__(self, dataset: TrainDataset, epoch: int):
        self.dataset, self.epoch = dataset, epoch

    def __len__(self) -> int:
        return len(self.dataset.plan(self.epoch))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of an epoch of {len(self)}")
        return self.dataset.batch(self.epoch, index % len(self))


def indexed_batches(
    batches: Iterable[dict], start: int = 0, wanted: Callable[[int], bool] = lambda i: True
) -> Iterator[tuple[int, dict]]:
    """(index, batch) for the batches at index >= ``start`` that are ``wanted`` (e.g. this process's
    share). A sequence (:class:`EpochBatches`) is indexed, so skipped batches are never loaded; any
    other iterable is consumed up to ``start``."""
    if isinstance(batches, Sequence):
        for i in range(start, len(batches)):
            if wanted(i):
                yield i, batches[i]
        return
    for i, batch in enumerate(batches):
        if i >= start and wanted(i):
            yield i, batch
