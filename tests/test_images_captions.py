"""Image modes, image size limits, large-image decoding, over-long captions, kohya's caption-dropout epochs."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny_models import tiny_tokenizer
from tsm_trainer.data import DatasetError, parse_dataset_config, process_caption, scan_dataset
from tsm_trainer.data.buckets import BucketChoice
from tsm_trainer.data.captions import ESTIMATED_CLIP, estimate_clip_tokens, tokenizer_caption_length
from tsm_trainer.data.config import SubsetConfig
from tsm_trainer.data.images import load_rgb, load_sample


def _grey16(value):
    return Image.fromarray(np.full((8, 8), value, np.uint16))


# (what is saved, file name, the RGB pixel it must load as)
MODES = [
    (lambda: _grey16(32768), "grey16.png", (128, 128, 128)),  # PIL's convert makes this (255, 255, 255)
    (lambda: _grey16(0), "black16.png", (0, 0, 0)),
    (lambda: _grey16(65535), "white16.png", (255, 255, 255)),
    (lambda: Image.new("L", (8, 8), 77), "grey.png", (77, 77, 77)),
    (lambda: Image.new("LA", (8, 8), (77, 128)), "grey_alpha.png", (77, 77, 77)),
    (lambda: Image.new("RGBA", (8, 8), (10, 200, 30, 0)), "rgba.png", (10, 200, 30)),  # alpha dropped, like kohya
    (lambda: Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4), "palette.png", (10, 200, 30)),
    (lambda: Image.new("1", (8, 8), 1), "bits.png", (255, 255, 255)),
    (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg", (255, 0, 0)),
]


@pytest.mark.parametrize("make, name, rgb", MODES, ids=[m[1] for m in MODES])
def test_image_modes_load_as_the_right_rgb(tmp_path, make, name, rgb):
    make().save(tmp_path / name)
    pixels = load_rgb(tmp_path / name)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - rgb).max() <= 2, pixels[0, 0]


def _config(image_dir, resolution=64, **subset):
    general = {
        "resolution": resolution,
        "caption_extension": ".txt",
        "batch_size": 1,
        "enable_bucket": True,
        "min_bucket_reso": 32,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 16,
    }
    return parse_dataset_config(
        {"general": general, "datasets": [{"subsets": [{"image_dir": str(image_dir), **subset}]}]}, "test.toml"
    )


def _image(folder, name, w, h, caption="a square", mode="RGB"):
    Image.new(mode, (w, h), 100 if mode != "RGB" else (100, 50, 20)).save(folder / name)
    (folder / (Path(name).stem + ".txt")).write_text(caption)


def test_tiny_and_extreme_images_are_reported_and_skipped_or_refused(tmp_path):
    _image(tmp_path, "ok.png", 64, 64)
    _image(tmp_path, "small_ok.png", 16, 24)  # enlarged 4x at most: kept
    _image(tmp_path, "dot.png", 1, 1)
    _image(tmp_path, "strip.png", 1000, 10)
    scan = scan_dataset(_config(tmp_path))
    assert sorted(Path(it.path).name for it in scan.items[0]) == ["ok.png", "small_ok.png"]
    reasons = {Path(p.path).name: p.reason for p in scan.problems}
    assert reasons["dot.png"].startswith("image of 1x1 would be enlarged 64.0x to fill its 64x64 bucket, beyond 4x")
    assert reasons["strip.png"].startswith("image of 1000x10 has an aspect ratio of 100:1, beyond 8:1")
    with pytest.raises(DatasetError, match=r"dot.png: image of 1x1 would be enlarged"):
        scan_dataset(_config(tmp_path), on_error="raise")


def test_a_float_image_is_refused_by_name(tmp_path, monkeypatch):
    import tsm_trainer.data.images as images

    monkeypatch.setattr(images, "IMAGE_EXTENSIONS", images.IMAGE_EXTENSIONS + (".tif",))
    Image.new("F", (8, 8), 0.5).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif: 32-bit float pixels \(mode F\) are not supported"):
        images.verify_image(tmp_path / "float.tif")


def test_a_large_jpeg_is_decoded_reduced_and_looks_the_same(tmp_path):
    y, x = np.mgrid[0:1024, 0:1024]
    smooth = np.stack([x / 4, y / 4, (x + y) / 8], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    assert load_rgb(tmp_path / "big.jpg").shape == (1024, 1024, 3)
    assert load_rgb(tmp_path / "big.jpg", (64, 64)).shape == (128, 128, 3)  # DCT-scaled 1/8, >= 2x the target
    choice = BucketChoice((64, 64), (64, 64))
    fast = load_sample((str(tmp_path / "big.jpg"),), False, choice, (0, 0), False)
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((64, 64), Image.LANCZOS))
    full = full.astype(np.float32) / 127.5 - 1
    assert np.abs(fast.permute(1, 2, 0).numpy() - full).mean() < 0.02


def test_over_long_captions_are_reported_once_per_file(tmp_path, caplog):
    long_caption = " ".join(f"word{i % 10}" if i % 2 else "tag" for i in range(500))  # 500 words
    _image(tmp_path, "long.png", 64, 64, long_caption)
    _image(tmp_path, "short.png", 64, 64, "a short caption")
    scan = scan_dataset(_config(tmp_path, num_repeats=3))
    assert [Path(w.path).name for w in scan.warnings] == ["long.png"]
    assert scan.warnings[0].reason.startswith("caption has 750 tokens, CLIP (estimated) reads 75: everything after")
    assert "word" in caplog.text and caplog.text.count("long.png") == 1
    # with the family's tokenizer (the tiny one splits into characters: 76 of them do not fit in 75)
    tokenizer = tiny_tokenizer()
    length = tokenizer_caption_length(tokenizer)
    assert length.limit == 75 and length.reader == "CLIP"
    _image(tmp_path, "short.png", 64, 64, "a" * 76)
    scan = scan_dataset(_config(tmp_path), caption_length=length)
    assert sorted(Path(w.path).name for w in scan.warnings) == ["long.png", "short.png"]
    short = next(w for w in scan.warnings if w.path.endswith("short.png"))
    assert short.reason.startswith("caption has 76 tokens, CLIP reads 75")


def test_the_token_estimate_is_a_lower_bound_of_clip():
    assert estimate_clip_tokens("a photo of 2 cats, sitting!!") == 8  # a photo of 2 cats , sitting !!
    assert ESTIMATED_CLIP.limit == 75


@pytest.mark.parametrize("n", [1, 2, 3])
def test_caption_dropout_every_n_epochs_counts_epochs_like_kohya(n):
    """kohya (train_util, epoch set to epoch + 1 by train_network.py): drop when epoch % n == 0 with
    epochs 1, 2, 3...; the first epoch keeps its captions unless n == 1."""
    subset = SubsetConfig(image_dir=Path("."), where="", caption_dropout_every_n_epochs=n)
    dropped = [process_caption("x", subset, np.random.default_rng(0), epoch=e) == "" for e in range(6)]
    assert dropped == [(kohya_epoch % n == 0) for kohya_epoch in range(1, 7)]
    if n > 1:
        assert not dropped[0]
