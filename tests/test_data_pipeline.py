"""Data pipeline: buckets, scanning bad input, captions, batches, resume, caches, video clips."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsm_trainer.data import (
    BucketSelector,
    DatasetError,
    LatentCache,
    TextEncoderCache,
    TrainDataset,
    make_bucket_resolutions,
    parse_dataset_config,
    process_caption,
    scan_dataset,
)
from tsm_trainer.data.config import SubsetConfig
from tsm_trainer.data.dataset import indexed_batches
from tsm_trainer.data.errors import DatasetConfigError


def img(path, w, h, color=(200, 30, 30), noise=False):
    if noise:
        arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    else:
        arr = np.zeros((h, w, 3), np.uint8) + np.array(color, np.uint8)
    Image.fromarray(arr).save(path)


def make_image_dir(root: Path) -> Path:
    d = root / "imgs"
    d.mkdir()
    img(d / "a.png", 64, 64)
    (d / "a.txt").write_text("tag0, tag1, tag2, tag3, tag4\n")
    img(d / "b.png", 192, 64, (10, 200, 10))  # aspect 3: exactly the 192x64 bucket
    (d / "b.txt").write_text("wide, green")
    img(d / "c.jpg", 64, 128, (10, 10, 200))
    (d / "c.txt").write_text("tall, blue")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (d / "corrupt.txt").write_text("x")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "trunc.txt").write_text("x")
    img(d / "nocap.png", 64, 64)
    (d / "notes.md").write_text("not an image")
    return d


def cfg_for(image_dir, root=".", **over):
    general = {
        "resolution": 128,
        "caption_extension": ".txt",
        "batch_size": 2,
        "enable_bucket": True,
        "min_bucket_reso": 64,
        "max_bucket_reso": 256,
    }
    subset = {"image_dir": str(image_dir)}
    for k, v in over.items():
        (subset if k in SubsetConfig.__dataclass_fields__ else general)[k] = v
    return parse_dataset_config({"general": general, "datasets": [{"subsets": [subset]}]}, "test.toml")


def test_bucket_list_matches_hand_computation():
    # area 128*128: w=64 -> h=min(256, 256)=256; w=128 -> 128; w=192 -> 85//64*64=64; w=256 -> 64
    assert make_bucket_resolutions((128, 128), 64, 256, 64) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]


def test_bucket_selection():
    sel = BucketSelector((128, 128), True, 64, 256, 64, False)
    assert sel.select(300, 100).bucket == (192, 64) and sel.select(300, 100).resized == (192, 64)
    c = sel.select(120, 200)  # aspect 0.6: closest is 64x192 (0.333), not 128x128 (1.0)
    assert c.bucket == (64, 192) and c.resized == (115, 192)
    assert sel.select(64, 64).bucket == (128, 128)  # upscaled
    nu = BucketSelector((128, 128), True, 64, 256, 64, True)
    assert nu.select(100, 70).bucket == (64, 64) and nu.select(100, 70).resized == (100, 70)  # no upscale
    assert nu.select(400, 200).bucket == (128, 64)
    fixed = BucketSelector((128, 96), False)
    assert fixed.select(400, 100).bucket == (128, 96) and fixed.select(400, 100).resized == (384, 96)


def test_bad_input_reported_with_paths_and_skipped(tmp_path, caplog):
    d = make_image_dir(tmp_path)
    scan = scan_dataset(cfg_for(d))
    names = sorted(Path(it.path).name for it in scan.items[0])
    assert names == ["a.png", "b.png", "c.jpg"]
    bad = {Path(p.path).name for p in scan.problems}
    assert bad == {"corrupt.png", "trunc.png", "nocap.png"}
    assert str(d / "corrupt.png") in caplog.text and str(d / "nocap.png") in caplog.text
    buckets = {Path(it.path).name: it.choice.bucket for it in scan.items[0]}
    assert buckets == {"a.png": (128, 128), "b.png": (192, 64), "c.jpg": (64, 192)}

    with pytest.raises(DatasetError) as ei:
        scan_dataset(cfg_for(d), on_error="raise")
    for name in ("corrupt.png", "trunc.png", "nocap.png"):
        assert str(d / name) in str(ei.value)


def test_class_tokens_replace_missing_captions(tmp_path):
    d = make_image_dir(tmp_path)
    scan = scan_dataset(cfg_for(d, class_tokens="sks dog"))
    caps = {Path(it.path).name: it.caption for it in scan.items[0]}
    assert caps["nocap.png"] == "sks dog" and caps["a.png"].startswith("tag0")


def test_empty_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"no usable images.*empty"):
        scan_dataset(cfg_for(empty))
    with pytest.raises(DatasetConfigError, match=r"'image_dir'.*missing_dir.*not a folder"):
        scan_dataset(cfg_for(tmp_path / "missing_dir"))
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(cfg_for(only_bad, class_tokens="t"))


def test_caption_processing_is_seeded_and_keeps_tokens():
    tags = ", ".join(f"t{i}" for i in range(10))
    sub = SubsetConfig(image_dir=Path("."), where="", shuffle_caption=True, keep_tokens=2)
    outs = [process_caption(tags, sub, np.random.default_rng(s)) for s in range(20)]
    assert outs[3] == process_caption(tags, sub, np.random.default_rng(3))
    assert len(set(outs)) > 1
    for o in outs:
        parts = o.split(", ")
        assert parts[:2] == ["t0", "t1"] and sorted(parts) == sorted(tags.split(", "))
    sep = SubsetConfig(image_dir=Path("."), where="", shuffle_caption=True, keep_tokens_separator="|||")
    o = process_caption("a, b ||| c, d, e ||| z", sep, np.random.default_rng(0))
    assert o.startswith("a, b, ") and o.endswith(", z")
    drop = SubsetConfig(image_dir=Path("."), where="", caption_dropout_rate=1.0)
    assert process_caption(tags, drop, np.random.default_rng(0)) == ""
    every = SubsetConfig(image_dir=Path("."), where="", caption_dropout_every_n_epochs=2)
    # epoch counts from 0 here, from 1 in kohya: kohya's epochs 2, 4... are our 1, 3...
    assert [process_caption("x", every, np.random.default_rng(0), epoch=e) for e in range(4)] == ["x", "", "x", ""]
    plain = SubsetConfig(image_dir=Path("."), where="", caption_prefix="pre", secondary_separator=";;;")
    assert process_caption("a;;;b\nsecond line", plain, np.random.default_rng(0)) == "pre a,b"


def test_batches_shapes_repeats_and_flip(tmp_path):
    d = tmp_path / "flip"
    d.mkdir()
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    for i in range(4):
        Image.fromarray(arr).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"img {i}")
    img(d / "wide.png", 192, 64)
    (d / "wide.txt").write_text("wide")
    ds = TrainDataset(scan_dataset(cfg_for(d, flip_aug=True, num_repeats=3, batch_size=2)), seed=1)
    seen, flips = [], []
    for batch in ds.epoch_batches(0):
        h, w = batch["bucket"]
        assert batch["pixels"].shape == (len(batch["keys"]), 3, h, w) and len(batch["keys"]) <= 2
        assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
        assert len(batch["captions"]) == len(batch["keys"]) and batch["is_reg"].shape == (len(batch["keys"]),)
        seen += batch["keys"]
        for k, f, px in zip(batch["keys"], batch["flipped"], batch["pixels"]):
            if k.endswith("wide.png"):
                continue
            flips.append(f)
            red_left = px[0, :, :8].mean() > 0.9  # (3, H, W): channel 0 = red, left columns
            assert red_left == (not f)
    assert sorted(seen) == sorted(str(p) for p in d.glob("*.png") for _ in range(3))
    assert any(flips) and not all(flips)
    assert ds.num_samples == 15 and len(ds) == 8  # 12 squares / 2 + ceil(3 / 2)


def test_batches_are_a_pure_function_of_seed_epoch_and_index(tmp_path):
    """What makes a resume exact: a fresh dataset (a new process) gives batch (epoch, i) bit for bit,
    without the batches before it; another seed or epoch gives another order."""
    d = make_image_dir(tmp_path)
    cfg = cfg_for(d, shuffle_caption=True, flip_aug=True, random_crop=True, batch_size=1, num_repeats=2)
    scan = scan_dataset(cfg)
    full = list(TrainDataset(scan, seed=7).epoch_batches(1))
    rest = [b for _, b in indexed_batches(TrainDataset(scan, seed=7).epoch_batches(1), start=2)]
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and a["flipped"] == b["flipped"]
        assert torch.equal(a["pixels"], b["pixels"])
    ref = TrainDataset(scan, seed=7)
    assert [pb.entries for pb in ref.plan(0)] != [pb.entries for pb in ref.plan(1)]  # new order per epoch
    assert [pb.entries for pb in TrainDataset(scan, seed=8).plan(1)] != [pb.entries for pb in ref.plan(1)]


def fake_vae(calls):
    def encode(pixels):
        calls.append(pixels.shape[0])
        flat = pixels.flatten(0, -4)  # (N, 3, H, W)
        lat = torch.nn.functional.avg_pool2d(flat, 8)
        return lat.reshape(*pixels.shape[:-3], 3, *lat.shape[-2:])

    return encode


def test_latent_cache_memory_and_disk(tmp_path):
    d = make_image_dir(tmp_path)
    scan = scan_dataset(cfg_for(d, flip_aug=True))
    calls = []
    cache = LatentCache(fake_vae(calls), namespace="vae-a")
    ds = TrainDataset(scan, seed=0, latent_cache=cache)
    assert ds.cache_latents() == 6 and sum(calls) == 6  # 3 images x 2 flips
    calls.clear()
    for batch in ds.epoch_batches(0):
        h, w = batch["bucket"]
        assert "pixels" not in batch and batch["latents"].shape[1:] == (3, h // 8, w // 8)
    assert calls == [] and cache.misses == 6 and cache.hits == 3

    disk = tmp_path / "cache"
    c1 = LatentCache(fake_vae(calls), cache_dir=disk, namespace="vae-a")
    TrainDataset(scan, latent_cache=c1).cache_latents()
    files = list(disk.iterdir())
    assert len(files) == 6 and all(f.suffix == ".safetensors" for f in files)
    c2 = LatentCache(None, cache_dir=disk, namespace="vae-a")  # VAE freed: must hit everything
    ds2 = TrainDataset(scan, latent_cache=c2)
    assert ds2.cache_latents() == 0
    batch = ds2.batch(0, 0)
    ref = TrainDataset(scan)
    assert torch.allclose(batch["latents"], fake_vae([])(ref.batch(0, 0)["pixels"]))
    # a touched file or another VAE misses
    os.utime(d / "a.png", ns=(1, 1))
    rescan = scan_dataset(cfg_for(d, flip_aug=True))
    assert TrainDataset(rescan, latent_cache=LatentCache(fake_vae(calls), disk, "vae-a")).cache_latents() == 2
    assert TrainDataset(scan, latent_cache=LatentCache(fake_vae(calls), disk, "vae-b")).cache_latents() == 6
    with pytest.raises(DatasetConfigError, match="random_crop"):
        TrainDataset(scan_dataset(cfg_for(d, random_crop=True)), latent_cache=cache)


def test_text_encoder_cache(tmp_path):
    d = make_image_dir(tmp_path)
    ds = TrainDataset(scan_dataset(cfg_for(d)))
    calls = []

    def encode(caps):
        calls.append(len(caps))
        return {
            "hidden": torch.stack([torch.full((4, 2), float(len(c))) for c in caps]),
            "pooled": torch.tensor([[float(len(c))] for c in caps]),
        }

    cache = TextEncoderCache(encode, cache_dir=tmp_path / "te", namespace="clip")
    assert cache.prepare(ds.static_captions()) == 3
    out = TextEncoderCache(None, tmp_path / "te", "clip").encode(["wide, green", "tall, blue"])
    assert out["hidden"].shape == (2, 4, 2) and out["pooled"][:, 0].tolist() == [11.0, 10.0]
    with pytest.raises(ValueError, match="cannot be cached"):
        TrainDataset(scan_dataset(cfg_for(d, shuffle_caption=True))).static_captions()
    in_memory = TextEncoderCache(encode)
    in_memory.encode(["a", "b", "a"])
    assert calls[-1] == 2 and "a" in in_memory  # each distinct caption once
    in_memory.clear()
    assert "a" not in in_memory
    with pytest.raises(ValueError, match="on disk is not cleared"):
        cache.clear()


def test_video_frame_folders(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    for c in range(3):
        clip = root / f"clip{c}"
        clip.mkdir()
        for f in range(3):
            img(clip / f"{f:04d}.png", 96, 64, (40 * f, 0, 0))
        (root / f"clip{c}.txt").write_text(f"clip {c}")
    short = root / "short"
    short.mkdir()
    img(short / "0.png", 96, 64)
    (root / "short.txt").write_text("short")
    scan = scan_dataset(cfg_for(root, video_frames=2, batch_size=2))
    assert [Path(p.path).name for p in scan.problems] == ["short"]
    ds = TrainDataset(scan)
    batches = list(ds.epoch_batches(0))
    assert sorted(len(b["keys"]) for b in batches) == [1, 2]
    for b in batches:
        h, w = b["bucket"]
        assert b["pixels"].shape == (len(b["keys"]), 2, 3, h, w)
        # frame order kept: frame 1 is brighter red than frame 0
        assert b["pixels"][:, 1, 0].mean() > b["pixels"][:, 0, 0].mean()
