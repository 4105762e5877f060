"""Caption dropout per epoch against kohya-ss sd-scripts' REAL ``BaseDataset.process_caption``.

Skipped unless TSM_SD_SCRIPTS_DIR points at an sd-scripts checkout (tested: 48d368fa) and the
interpreter has sd-scripts' dependencies:

    TSM_SD_SCRIPTS_DIR=/path/to/sd-scripts PYTHONPATH=$PWD /path/to/sd-scripts-venv/bin/python \\
        -m pytest tests/test_kohya_captions_real.py -q

sd-scripts' dataset learns its epoch from the training loop (train_network.py sets
``current_epoch.value = epoch + 1`` and the collator passes it to ``set_current_epoch``), so its
epochs count from 1; ours count from 0.
"""

import inspect
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from tsm_trainer.data import process_caption
from tsm_trainer.data.config import SubsetConfig

SD_SCRIPTS = os.environ.get("TSM_SD_SCRIPTS_DIR")
pytestmark = pytest.mark.skipif(not SD_SCRIPTS, reason="set TSM_SD_SCRIPTS_DIR to a kohya-ss sd-scripts checkout")


@pytest.fixture(scope="module")
def train_util():
    sys.path.insert(0, SD_SCRIPTS)
    from library import train_util

    return train_util


def _kohya_subset(train_util, every_n: int, rate: float = 0.0):
    params = inspect.signature(train_util.BaseSubset.__init__).parameters
    values = {name: None for name in params if name != "self"}
    values.update(
        image_dir=".",
        num_repeats=1,
        shuffle_caption=False,
        caption_separator=",",
        keep_tokens=0,
        keep_tokens_separator="",
        enable_wildcard=False,
        color_aug=False,
        flip_aug=False,
        random_crop=False,
        caption_dropout_rate=rate,
        caption_dropout_every_n_epochs=every_n,
        caption_tag_dropout_rate=0.0,
        token_warmup_min=1,
        token_warmup_step=0,
    )
    return train_util.BaseSubset(**values)


def test_the_training_loop_numbers_epochs_from_one():
    source = Path(SD_SCRIPTS, "train_network.py").read_text(encoding="utf-8")
    assert "current_epoch.value = epoch + 1" in source


@pytest.mark.parametrize("every_n", [1, 2, 3])
def test_caption_dropout_every_n_epochs_matches_kohya(train_util, every_n):
    dataset = object.__new__(train_util.BaseDataset)  # process_caption reads only these attributes
    dataset.current_step, dataset.max_train_steps, dataset.replacements = 0, 100, {}
    kohya_subset = _kohya_subset(train_util, every_n)
    ours = SubsetConfig(image_dir=Path("."), where="", caption_dropout_every_n_epochs=every_n)
    for epoch in range(7):  # ours, from 0
        dataset.current_epoch = epoch + 1  # what train_network.py gives the dataset for this epoch
        random.seed(epoch)
        kohya = train_util.BaseDataset.process_caption(dataset, kohya_subset, "a red square")
        mine = process_caption("a red square", ours, np.random.default_rng(epoch), epoch=epoch)
        assert mine == kohya, (every_n, epoch, kohya)
