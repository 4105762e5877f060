"""kohya folder datasets (--train_data_dir N_concept folders, --reg_data_dir) and reg balancing."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from tsm_trainer.data import (
    DatasetConfigError,
    TrainDataset,
    concept_folder_params,
    folder_dataset_config,
    parse_dataset_config,
    scan_dataset,
)


def images(folder: Path, n: int, captions: dict[int, str] | None = None, ext: str = ".caption") -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        if captions and i in captions:
            (folder / f"{i}{ext}").write_text(captions[i])


def test_concept_folder_names_parse_as_kohya():
    assert concept_folder_params("10_sks cat") == (10, "sks cat")
    assert concept_folder_params("3_a_b") == (3, "a_b")
    assert concept_folder_params("5") == (5, "")
    for name in ("cat", "0_cat", "-2_cat", "x_1"):
        assert concept_folder_params(name) is None


def test_repeats_captions_and_is_reg(tmp_path):
    images(tmp_path / "train" / "10_cat", 2, {0: "a photo of a cat, sitting"})
    images(tmp_path / "train" / "1_dog", 1)
    images(tmp_path / "train" / "misc", 1)  # no repeat count: skipped as kohya does
    images(tmp_path / "reg" / "1_cat", 4)
    cfg = folder_dataset_config(
        tmp_path / "train",
        tmp_path / "reg",
        resolution=16,
        batch_size=3,
        caption_extension="caption",
        shuffle_caption=True,
        keep_tokens=1,
        flip_aug=True,
    )
    (d,) = cfg.datasets
    assert d.resolution == (16, 16) and d.batch_size == 3
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in d.subsets] == [
        ("10_cat", 10, "cat", False),
        ("1_dog", 1, "dog", False),
        ("1_cat", 1, "cat", True),
    ]
    sub = d.subsets[0]
    assert sub.caption_extension == ".caption" and sub.shuffle_caption and sub.keep_tokens == 1 and sub.flip_aug
    assert "--reg_data_dir" in d.subsets[2].where and "1_cat" in d.subsets[2].where

    ds = TrainDataset(scan_dataset(cfg), seed=3)
    uses, reg_flags, captions = Counter(), {}, {}
    for batch in ds.epoch_batches(0):
        assert batch["is_reg"].dtype == torch.bool and batch["is_reg"].shape == (len(batch["keys"]),)
        for key, reg, caption in zip(batch["keys"], batch["is_reg"].tolist(), batch["captions"]):
            uses[key] += 1
            reg_flags[key] = reg
            captions[key] = caption
    train, reg = tmp_path / "train", tmp_path / "reg"
    # 21 training samples per epoch; 4 reg images balanced to 21: 1 each, then +1 in turn -> 6, 5, 5, 5
    assert uses == {
        str(train / "10_cat" / "0.png"): 10,
        str(train / "10_cat" / "1.png"): 10,
        str(train / "1_dog" / "0.png"): 1,
        **{str(reg / "1_cat" / f"{i}.png"): r for i, r in enumerate((6, 5, 5, 5))},
    }
    assert ds.num_samples == 42 and len(ds) == 14  # one bucket: 42 samples in batches of 3
    assert {k for k, r in reg_flags.items() if r} == {str(reg / "1_cat" / f"{i}.png") for i in range(4)}
    assert captions[str(train / "10_cat" / "1.png")] == "cat"  # no caption file: class tokens
    assert captions[str(train / "1_dog" / "0.png")] == "dog"
    assert sorted(captions[str(train / "10_cat" / "0.png")].split(", ")) == ["a photo of a cat", "sitting"]


def test_more_reg_than_training_images_leaves_some_unused(tmp_path):
    images(tmp_path / "train" / "1_dog", 1)
    images(tmp_path / "reg" / "2_dog", 3)
    ds = TrainDataset(scan_dataset(folder_dataset_config(tmp_path / "train", tmp_path / "reg", resolution=16)))
    assert ds._repeats == [[1, 2, 0, 0]]  # kohya: the first reg image's repeats already reach 1
    assert ds.num_samples == 3


def test_toml_is_reg_is_balanced_too(tmp_path):
    images(tmp_path / "a", 2, {0: "x", 1: "y"})
    images(tmp_path / "r", 1, {0: "z"})
    raw = {
        "general": {"resolution": 16, "caption_extension": ".caption"},
        "datasets": [
            {
                "subsets": [
                    {"image_dir": str(tmp_path / "a"), "num_repeats": 3},
                    {"image_dir": str(tmp_path / "r"), "is_reg": True},
                ]
            }
        ],
    }
    ds = TrainDataset(scan_dataset(parse_dataset_config(raw)))
    assert ds._repeats == [[3, 3, 6]]
    only_reg = {
        "general": {"resolution": 16},
        "datasets": [
            {"subsets": [{"image_dir": str(tmp_path / "r"), "is_reg": True, "caption_extension": ".caption"}]}
        ],
    }
    with pytest.raises(DatasetConfigError, match="only regularisation images"):
        TrainDataset(scan_dataset(parse_dataset_config(only_reg)))


def test_bad_folders_and_options_are_named(tmp_path):
    with pytest.raises(DatasetConfigError, match=r"--train_data_dir .*nope: not a folder"):
        folder_dataset_config(tmp_path / "nope", resolution=16)
    flat = tmp_path / "flat"
    images(flat, 2)
    with pytest.raises(DatasetConfigError, match=r"no <repeats>_<concept> sub-folder.*holds 2 image\(s\) directly"):
        folder_dataset_config(flat, resolution=16)
    images(tmp_path / "t" / "2_x", 1)
    with pytest.raises(DatasetConfigError, match=r"--reg_data_dir .*flat: no <repeats>_<concept>"):
        folder_dataset_config(tmp_path / "t", flat, resolution=16)
    with pytest.raises(DatasetConfigError, match="'batch_size' = 0 is invalid"):
        folder_dataset_config(tmp_path / "t", resolution=16, batch_size=0)
    with pytest.raises(DatasetConfigError, match="unknown key 'flip_augment'"):
        folder_dataset_config(tmp_path / "t", resolution=16, flip_augment=True)
    assert folder_dataset_config(tmp_path / "t", resolution="64,32").datasets[0].resolution == (64, 32)  # kohya's W,H
    assert folder_dataset_config(tmp_path / "t", resolution="64").datasets[0].resolution == (64, 64)
    with pytest.raises(DatasetConfigError, match=r"--resolution '512x512': expected SIZE or WIDTH,HEIGHT"):
        folder_dataset_config(tmp_path / "t", resolution="512x512")
    with pytest.raises(DatasetConfigError, match="'num_repeats' comes from the folder names"):
        folder_dataset_config(tmp_path / "t", resolution=16, num_repeats=3)
