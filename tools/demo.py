"""The embedded demo: fine-tune the committed tiny base model on a new domain with TSM n=4 and with
vanilla LoRA at both of the paper's budgets (as long as each TSM expert, S/4 steps; and as long as
the whole TSM run, S steps), print the held-out denoising loss per timestep interval side by side,
write the files and a PNG grid of samples before / after. CPU, about a minute.

The base model (demo_assets/base_model, built by tools/make_demo_assets.py) knows shapes in six
colours; the target domain shows the same shapes in three colours it never saw (pink, cyan, brown).

Example:
    python tools/demo.py --steps 400 --output_dir outputs/demo
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERTS = 4  # docs/results.md: n = 4 beats vanilla at the paper's budget and ties it at equal total steps
PROMPTS = [
    "a pink circle on a white background",
    "a cyan star on a black background",
    "a brown square on a gray background",
    "a pink triangle on a striped background",
    "a cyan cross on a checkered background",
    "a brown star on a white background",
]


def write_data(folder: str, n: int, seed: int) -> str:
    from demo_world.shapes import write_dataset
    from tsm_trainer.data import write_dataset_config

    images = os.path.join(folder, "images")
    if not os.path.isdir(images):
        write_dataset(images, n, "target", seed)
    return write_dataset_config(os.path.join(folder, "target.toml"), images, resolution=64, batch_size=8)


def colour_accuracy(images, prompts) -> float:
    """Share of images whose colour, read back by the shapes world's detector, is the prompt's."""
    from demo_world.attribute_score import score_images

    words = [p.split() for p in prompts]  # "a {colour} {shape} on a {background} background"
    return score_images(images, [{"colour": w[1], "shape": w[2], "background": w[5]} for w in words])["colour"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps S of TSM and of the longer vanilla run")
    parser.add_argument("--images", type=int, default=320, help="target-domain images (20%% held out)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--output_dir", default="outputs/demo")
    args = parser.parse_args(argv)

    import torch

    from tsm_trainer.core.intervals import interval_timestep_range
    from tsm_trainer.evaluation import labelled_grid
    from tsm_trainer.families import get_training_family
    from tsm_trainer.training.build import build
    from tsm_trainer.training.config import TrainConfig

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()
    base = os.path.join(ROOT, "demo_assets", "base_model")
    if not os.path.isfile(os.path.join(base, "model_index.json")):
        print(f"error: {base} is missing; build it with python tools/make_demo_assets.py", file=sys.stderr)
        return 2
    toml = write_data(os.path.join(args.output_dir, "data"), args.images, seed=1)

    family = get_training_family("sd1")
    components = family.load(base)
    base_images = family.sample(components, PROMPTS, args.sample_steps, 5.0, 64, seed=0)
    rows = [("base model", base_images)]
    losses, accuracy = {}, {"base model": colour_accuracy(base_images, PROMPTS)}
    n = EXPERTS
    runs = (
        (f"vanilla, S/{n}", "vanilla_per_expert", "vanilla", max(1, args.steps // n)),
        (f"TSM n={n}", f"tsm{n}", "foster", args.steps),
        ("vanilla, S", "vanilla", "vanilla", args.steps),
    )
    for label, name, stage, steps in runs:
        config = TrainConfig(
            pretrained_model_name_or_path=base,
            dataset_config=toml,
            output_dir=args.output_dir,
            output_name=name,
            tsm_stage=stage,
            max_train_steps=steps,
            learning_rate=args.learning_rate,
            network_dim=4,
            network_alpha=4,
            network_train_unet_only=True,
            cache_latents=True,
            validation_split=0.2,
            seed=0,
            overwrite=True,  # a rerun with other --steps replaces the demo's own files
            **({"tsm_scales": str(n)} if stage == "foster" else {}),
        )
        print(f"\n== {label}: {steps} steps")
        trainer = build(config, log=print)
        losses["base model"] = losses.get("base model") or _base_losses(trainer)
        trainer.run()
        losses[label] = trainer.validate()
        images = trainer.family.sample(trainer.c, PROMPTS, args.sample_steps, 5.0, 64, seed=0)
        rows.append((label, images))
        accuracy[label] = colour_accuracy(images, PROMPTS)

    print(
        f"\nHeld-out denoising loss per timestep interval on the target domain (same held-out images, noise "
        f"and timesteps for every row). S = {args.steps} steps; each of the {n} TSM experts saw ~1/{n} of the "
        f"batches, as many as 'vanilla, S/{n}' (the paper's budget); 'vanilla, S' costs what TSM cost:"
    )
    heads = [f"[{lo},{hi})" for lo, hi in (interval_timestep_range(i, 8) for i in range(8))]
    print(f"{'':<16}" + "".join(f"{h:>11}" for h in heads) + f"{'mean':>9}")
    for label, values in losses.items():
        print(f"{label:<16}" + "".join(f"{v:>11.4f}" for v in values) + f"{sum(values) / len(values):>9.4f}")
    print(
        "\nColour asked for = colour seen (attribute detector, 6 target prompts): "
        + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items())
    )
    grid_path = os.path.join(args.output_dir, "samples_before_after.png")
    labelled_grid(rows).save(grid_path)
    files = ", ".join(f"{args.output_dir}/{name}.safetensors" for _, name, _, _ in runs)
    print(f"\nwrote {files} and {grid_path} in {time.time() - start:.0f} s")
    return 0


def _base_losses(trainer) -> list[float]:
    """Validation losses of the base model: the same held-out draw with the LoRA switched off."""
    trainer.network.set_multiplier(0.0)
    try:
        return trainer.validate()
    finally:
        trainer.network.set_multiplier(1.0)


if __name__ == "__main__":
    sys.exit(main())
