"""Epoch plans: which items form which batch, in which order, as a pure function of (seed, epoch).

kohya semantics: each dataset keeps its own batch_size; an item appears repeats[d][i] times (its
subset's num_repeats, or the balanced count of a regularisation image, see ``item_repeats``);
batches hold one bucket only (the last batch of a bucket may be smaller); the batches of all
datasets are then shuffled together. Because the plan depends only on (seed, epoch), a resumed
run that skips to (epoch, position) sees exactly the batches the interrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tsm_trainer.data.scan import Item


@dataclass(frozen=True)
class PlannedBatch:
    """dataset: index into the config's datasets; bucket: (w, h); entries: indices into items[dataset]."""

    dataset: int
    bucket: tuple[int, int]
    entries: tuple[int, ...]


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """Independent generator for (seed, epoch, *more); non-negative ints only."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, *more])


def plan_epoch(
    items: list[list[Item]],
    batch_sizes: list[int],
    repeats: list[list[int]],
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[PlannedBatch]:
    """Batches of one epoch. repeats[d][i] = how often items[d][i] appears (0: not used)."""
    batches: list[PlannedBatch] = []
    for d, ds_items in enumerate(items):
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, it in enumerate(ds_items):
            by_bucket.setdefault(it.choice.bucket, []).extend([i] * repeats[d][i])
        rng = epoch_rng(seed, epoch, 1, d)
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            if shuffle:
                idx = [idx[k] for k in rng.permutation(len(idx))]
            bs = batch_sizes[d]
            batches += [PlannedBatch(d, bucket, tuple(idx[k : k + bs])) for k in range(0, len(idx), bs)]
    if shuffle:
        order = epoch_rng(seed, epoch, 2).permutation(len(batches))
        batches = [batches[k] for k in order]
    return batches
