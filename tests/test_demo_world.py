"""The demo's shapes world (rendering, captions, detector, kohya dataset layout) and its base-model build."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from demo_world import base_model as bm
from demo_world import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_render_is_deterministic_and_jittered():
    a = np.asarray(shapes.render("star", "red", "striped", rng=np.random.default_rng(3)))
    b = np.asarray(shapes.render("star", "red", "striped", rng=np.random.default_rng(3)))
    c = np.asarray(shapes.render("star", "red", "striped", rng=np.random.default_rng(4)))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    imgs1, attrs1, caps1 = shapes.make_arrays(20, "base", seed=5)
    imgs2, attrs2, caps2 = shapes.make_arrays(20, "base", seed=5)
    assert np.array_equal(imgs1, imgs2) and attrs1 == attrs2 and caps1 == caps2
    assert shapes.render("circle", "blue", "white", size=32).size == (32, 32)
    with pytest.raises(ValueError):
        shapes.render("hexagon", "red", "white")
    with pytest.raises(ValueError):
        shapes.render("circle", "mauve", "white")


def test_captions_and_domains():
    assert (
        shapes.caption({"shape": "circle", "colour": "red", "background": "white"})
        == "a red circle on a white background"
    )
    rng = np.random.default_rng(0)
    base = [shapes.sample_attributes(rng, "base") for _ in range(300)]
    target = [shapes.sample_attributes(rng, "target") for _ in range(300)]
    assert {a["colour"] for a in base} == set(shapes.BASE_COLOURS)
    assert {a["colour"] for a in target} == set(shapes.TARGET_COLOURS)
    assert not set(shapes.BASE_COLOURS) & set(shapes.TARGET_COLOURS)
    assert {a["shape"] for a in base} == set(shapes.SHAPES)
    assert {a["background"] for a in target} == set(shapes.BACKGROUNDS)
    assert all(shapes.domain_of(a) == "target" for a in target)
    with pytest.raises(ValueError):
        shapes.sample_attributes(rng, "other")


@pytest.mark.parametrize("domain", ["base", "target"])
def test_detector_reads_renders(domain):
    images, attrs, _ = shapes.make_arrays(250, domain, seed=11)
    correct = {"shape": 0, "colour": 0, "background": 0}
    for img, a in zip(images, attrs):
        det = shapes.detect_attributes(img)
        for k in correct:
            correct[k] += det[k] == a[k]
    for k, v in correct.items():
        assert v / len(images) > 0.95, (k, v)


def test_detector_on_pil_and_empty_image():
    from PIL import Image

    img = shapes.render("cross", "orange", "checkered", rng=1)
    assert shapes.detect_attributes(img) == {"shape": "cross", "colour": "orange", "background": "checkered"}
    blank = Image.new("RGB", (64, 64), (240, 240, 240))
    assert shapes.detect_attributes(blank) == {"shape": None, "colour": None, "background": "white"}


def test_write_dataset_kohya_layout(tmp_path):
    recs = shapes.write_dataset(tmp_path / "target", 12, domain="target", seed=2)
    pngs = sorted(p for p in os.listdir(tmp_path / "target") if p.endswith(".png"))
    assert len(pngs) == 12
    for rec, png in zip(recs, pngs):
        assert rec["file"] == png
        with open(tmp_path / "target" / png.replace(".png", ".txt")) as f:
            assert f.read().strip() == rec["caption"] == shapes.caption(rec)
        assert rec["colour"] in shapes.TARGET_COLOURS
    lines = (tmp_path / "target" / "attributes.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == recs
    again = shapes.write_dataset(tmp_path / "again", 12, domain="target", seed=2)
    assert again == recs
    assert (tmp_path / "again" / "00003.png").read_bytes() == (tmp_path / "target" / "00003.png").read_bytes()


def test_tokenizer_has_one_token_per_world_word(tmp_path):
    from transformers import CLIPTokenizer

    bm.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 77
    ids = tok("a pink star on a checkered background").input_ids
    assert len(ids) == 2 + 7 and ids[0] == 0 and ids[-1] == 1
    assert len(tok("a purplish hexagon").input_ids) > 5  # unknown words fall back to pieces, not errors
    assert len(tok) < 200


def test_quick_build_gives_a_loadable_pipeline(tmp_path):
    import torch

    out = tmp_path / "assets"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "make_demo_assets.py"),
            "--quick",
            "--out_dir",
            str(out),
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "timings:" in proc.stdout
    folder = out / "base_model"
    assert (out / "sample_grid.png").exists()
    assert bm.folder_size(folder) <= 20e6
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor != 0.18215
    result = pipe(
        ["a red circle on a white background", "a pink star on a striped background"],
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert result.images.shape == (2, 64, 64, 3)
    assert np.isfinite(result.images).all()


def test_frechet_distance_matches_the_gaussian_closed_form():
    from demo_world.features import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N(m, 4I): |m|^2 + 3 (1 + 4 - 2 * 2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_feature_distance_separates_domains():
    from demo_world.features import extract, frechet_distance, train_feature_net

    net = train_feature_net(n_images=600, steps=150)
    base1 = extract(net, shapes.make_arrays(200, "base", seed=1)[0])
    base2 = extract(net, shapes.make_arrays(200, "base", seed=2)[0])
    target = extract(net, shapes.make_arrays(200, "target", seed=3)[0])
    assert base1.shape == (200, 64)
    assert frechet_distance(base1, base2) < 0.5 * frechet_distance(base1, target)
