"""Compare a base model with LoRA / TSM files on held-out data: denoising loss per timestep interval
(one fixed draw of noise and timesteps, identical for every file), a plot of loss against t for all
files on one chart, and a grid of samples from fixed seeds and prompts.

Files are native TSM files (any stage) or plain kohya LoRAs. Writes to --output_dir:
losses.md and losses.json (per-interval and per-bin losses), loss_vs_t.png, samples.png and, for
the demo world with --attribute_score, attribute scores (colour / shape / background read back).

Example:
    python tools/evaluate.py --pretrained_model demo_assets/base_model \\
        --dataset_config outputs/demo/data/target.toml --validation_split 0.2 \\
        --files outputs/demo/vanilla.safetensors outputs/demo/tsm8.safetensors --output_dir outputs/eval
    python tools/evaluate.py --pretrained_model my_sd15 --dataset_config heldout.toml \\
        --files a.safetensors b.safetensors --labels "LoRA r4" "TSM n8" --prompts prompts.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from tsm_trainer.cli.python_version import require_python_311


def main(argv=None) -> int:
    require_python_311()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model", required=True, help="base model: a local diffusers folder")
    p.add_argument("--dataset_config", required=True, help="kohya dataset TOML of the evaluation images")
    p.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="evaluate on the split train_tsm.py held out with this --validation_split and --seed "
        "(default 0: every image of the dataset config)",
    )
    p.add_argument("--seed", type=int, default=0, help="the training run's --seed (for the split)")
    p.add_argument("--files", nargs="+", default=[], help="LoRA / TSM .safetensors files to compare")
    p.add_argument("--labels", nargs="+", help="a label per file (default: file names)")
    p.add_argument("--no_base", action="store_true", help="leave the base model out of the comparison")
    p.add_argument("--bins", type=int, default=32, help="equal t-bins of the loss curve (a multiple of 8)")
    p.add_argument("--draw_seed", type=int, default=1234, help="seed of the fixed noise / timestep draw")
    p.add_argument("--prompts", help="text file, one prompt per line (default: up to 8 held-out captions)")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sample_seed", type=int, default=0)
    p.add_argument(
        "--attribute_score",
        choices=["none", "heldout", "all"],
        default="none",
        help="demo world only: score samples of the target domain's held-out (or all) combinations",
    )
    p.add_argument("--score_seeds", type=int, default=1, help="images per prompt for --attribute_score")
    p.add_argument("--output_dir", default="outputs/evaluate")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.files):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.files)} files")
    if args.bins < 8 or args.bins % 8:
        p.error(f"--bins {args.bins}: must be a positive multiple of 8 (the table has 8 intervals)")
    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        p.error(f"--files: not found: {', '.join(missing)}")
    if args.attribute_score != "none" and importlib.util.find_spec("demo_world") is None:
        # demo_world/ is in a clone, not in the installed package
        p.error(
            "--attribute_score: needs the demo world (demo_world/ of a tsm-trainer clone, which is not "
            "installed with the package); run tools/evaluate.py from a clone"
        )

    from tsm_trainer.core.file_format import TSMFileError
    from tsm_trainer.evaluation import evaluate_files, labelled_grid, plot_loss_curves
    from tsm_trainer.evaluation.heldout import heldout_batches
    from tsm_trainer.evaluation.report import loss_table, score_table
    from tsm_trainer.families import detect_folder_family, get_training_family

    try:
        batches = heldout_batches(args.dataset_config, args.validation_split, args.seed)
        spec = detect_folder_family(args.pretrained_model)
        family = get_training_family(spec.name)
        components = family.load(args.pretrained_model)
        components.family = spec
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    else:
        prompts = list(dict.fromkeys(c for b in batches for c in b["captions"]))[:8]
    size = batches[0]["pixels"].shape[-1]
    score = None
    if args.attribute_score != "none":
        from demo_world.attribute_score import all_combos, attribute_score, heldout_combos

        combos = heldout_combos() if args.attribute_score == "heldout" else all_combos()
        seeds = [args.sample_seed + 1000 * k for k in range(args.score_seeds)]
        score = lambda generate: attribute_score(generate, combos, seeds)  # noqa: E731
    try:
        result = evaluate_files(
            family,
            components,
            batches,
            args.files,
            args.labels,
            not args.no_base,
            args.bins,
            args.draw_seed,
            prompts,
            args.sample_steps,
            args.guidance,
            size,
            args.sample_seed,
            score,
        )
    except TSMFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.output_dir, exist_ok=True)
    n_images = sum(len(b["captions"]) for b in batches)
    print(
        f"\nHeld-out denoising loss per timestep interval ({n_images} images, same noise and timesteps for "
        f"every model):\n" + loss_table(result)
    )
    report = {
        "images": n_images,
        "bins": args.bins,
        "draw_seed": args.draw_seed,
        "losses_per_bin": result.losses,
        "losses_per_interval": {k: result.interval_losses(k) for k in result.losses},
        "mean_loss": {k: result.mean_loss(k) for k in result.losses},
    }
    markdown = loss_table(result, markdown=True)
    if result.scores:
        print(
            "\nAttribute score (fraction of samples whose detected attribute is the one asked for):\n"
            + score_table(result)
        )
        report["attribute_scores"] = result.scores
        markdown += "\n\n" + score_table(result, markdown=True)
    with open(os.path.join(args.output_dir, "losses.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.output_dir, "losses.md"), "w") as f:
        f.write(markdown + "\n")
    plot = plot_loss_curves(result.losses, result.num_train_timesteps, os.path.join(args.output_dir, "loss_vs_t.png"))
    grid = os.path.join(args.output_dir, "samples.png")
    labelled_grid(list(result.samples.items()), size=max(64, size)).save(grid)
    print(f"\nwrote {args.output_dir}/losses.md, losses.json, {os.path.basename(plot)} and samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
