"""Distil the demo base model into a 4-step student with vanilla LoRA and with TSM (one expert per
student step) at equal steps, and compare both with the teacher at 50 steps (paper section 4.3 at
demo scale).

Usage (from the repository root)::

    python bench/distill.py            # about 15 min on 2 CPU cores
    python bench/distill.py --quick    # about 5 min

Prints and writes ``results.md`` / ``results.json`` / ``samples.png`` to --output_dir: per sampler, the
attribute score on every base-domain combination (colour / shape / background read back) and a
small-sample FID-like distance (Fréchet distance of features of a CNN trained here on the shapes world,
``demo_world.features``) to fresh real renders, plus the CPU minutes each student took.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = dict(steps=400, images=1000, real=600, score_seeds=2)
QUICK = dict(steps=60, images=256, real=300, score_seeds=1)
STUDENT_STEPS = [999, 749, 499, 249]


def write_data(folder: str, n: int) -> str:
    from demo_world import shapes
    from tsm_trainer.data import write_dataset_config

    images = os.path.join(folder, "images")
    if not os.path.isfile(os.path.join(images, "attributes.jsonl")):
        shapes.write_dataset(images, n, "base", seed=7)
    return write_dataset_config(os.path.join(folder, "base.toml"), images, resolution=64, batch_size=8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, help="student updates per method (default 400; quick 60)")
    p.add_argument("--fake_updates", type=int, default=3, help="fake-score updates per student update")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--real_guidance", type=float, default=4.0, help="teacher CFG (the demo's sampling guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output_dir", default=os.path.join("outputs", "distill"))
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    steps = args.steps or preset["steps"]

    import torch

    from demo_world import shapes
    from demo_world.attribute_score import all_combos, score_images
    from demo_world.features import extract, frechet_distance, train_feature_net
    from tsm_trainer.evaluation import labelled_grid, load_lora_file
    from tsm_trainer.families import get_training_family
    from tsm_trainer.training.build import build
    from tsm_trainer.training.config import TrainConfig
    from tsm_trainer.training.distill.sampler import sample_student

    torch.set_num_threads(args.threads)
    start = time.time()
    base = os.path.join(ROOT, "demo_assets", "base_model")
    os.makedirs(args.output_dir, exist_ok=True)
    toml = write_data(os.path.join(args.output_dir, "data"), preset["images"])
    log = lambda m: print(m, flush=True)  # noqa: E731

    minutes = {}
    files = {}
    for label, stage in (("LoRA", "vanilla"), ("TSM n=4", "foster")):
        name = "lora" if stage == "vanilla" else "tsm4"
        path = os.path.join(args.output_dir, f"{name}.safetensors")
        if not os.path.isfile(path):
            config = TrainConfig(
                task="distill",
                pretrained_model_name_or_path=base,
                dataset_config=toml,
                output_dir=args.output_dir,
                output_name=name,
                tsm_stage=stage,
                network_dim=args.rank,
                network_alpha=args.rank,
                max_train_steps=steps,
                learning_rate=args.learning_rate,
                distill_fake_updates=args.fake_updates,
                distill_fake_rank=2 * args.rank,
                distill_real_guidance=args.real_guidance,
                cache_latents=True,
                seed=args.seed,
            )
            t = time.time()
            with contextlib.redirect_stderr(io.StringIO()):
                build(config, log=lambda m: None).run()
            minutes[label] = (time.time() - t) / 60
            log(
                f"distilled {label}: {steps} student updates x {args.fake_updates} fake updates in "
                f"{minutes[label]:.1f} min"
            )
        files[label] = path

    log("evaluating")
    net = train_feature_net()
    real = extract(net, shapes.make_arrays(preset["real"], "base", seed=4242)[0])
    family = get_training_family("sd1")
    c = family.load(base)
    combos = all_combos("base")
    prompts = [shapes.caption(a) for a in combos]
    seeds = [100 + k for k in range(preset["score_seeds"])]
    samplers = {
        "teacher, 50 DDIM steps": lambda s: family.sample(c, prompts, 50, args.real_guidance, 64, s),
        "teacher, 4 DDIM steps": lambda s: family.sample(c, prompts, 4, args.real_guidance, 64, s),
    }
    for label, path in files.items():
        samplers[f"{label} student, 4 steps"] = lambda s, path=path: _with(
            path, c, family, lambda: sample_student(family, c, prompts, STUDENT_STEPS, 64, s), load_lora_file
        )
    rows, grid = {}, []
    for label, sample in samplers.items():
        t = time.time()
        images = [im for s in seeds for im in sample(s)]
        score = score_images(images, combos * len(seeds))
        rows[label] = {"fd": frechet_distance(extract(net, images), real), **score, "sample_seconds": time.time() - t}
        grid.append((label, images[:12]))
        log(f"  {label}: FD {rows[label]['fd']:.2f}, attributes {score}")
    renders, render_attrs, _ = shapes.make_arrays(len(prompts) * len(seeds), "base", seed=99)
    real_fd = frechet_distance(extract(net, renders), real)
    real_score = score_images(list(renders), render_attrs)

    lines = [
        f"Distilled for {steps} student updates ({args.fake_updates} fake-score updates each, batch 8, rank "
        f"{args.rank}, teacher guidance {args.real_guidance}); scored on all {len(combos)} base-domain "
        f"combinations x {len(seeds)} seed(s) against {preset['real']} real renders.",
        "",
        "| sampler | FD to real (lower is better) | colour % | shape % | background % | all % |",
        "|---|---|---|---|---|---|",
        f"| real renders (floor: as many fresh renders) | {real_fd:.2f} | "
        + " | ".join(f"{100 * real_score[k]:.1f}" for k in ("colour", "shape", "background", "all"))
        + " |",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['fd']:.2f} | {100 * r['colour']:.1f} | {100 * r['shape']:.1f} | "
            f"{100 * r['background']:.1f} | {100 * r['all']:.1f} |"
        )
    cost = ", ".join(f"{k} {v:.1f} CPU min" for k, v in minutes.items()) or "students reused"
    lines += ["", f"Training cost on this machine: {cost}; total {(time.time() - start) / 60:.1f} min."]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "real_fd": real_fd, "train_minutes": minutes, "steps": steps}, f, indent=2)
    labelled_grid(grid, label_width=190).save(os.path.join(args.output_dir, "samples.png"))
    print("\n" + md)
    return 0


def _with(path, c, family, fn, load):
    network = load(path, c, family.num_train_timesteps)
    try:
        return fn()
    finally:
        network.remove()


if __name__ == "__main__":
    sys.exit(main())
