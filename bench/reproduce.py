"""A small-scale reproduction of the paper's ablations (Tables 8 and 11) on the demo world.

Usage (from the repository root)::

    python bench/reproduce.py            # 3 seeds (about 45 min on 2 CPU cores)
    python bench/reproduce.py --quick    # 1 seed, fewer steps (about 4 min)

Fine-tunes the committed demo base model (demo_assets/base_model) on the target domain (shapes in
pink, cyan, brown: colours and words it never saw) with, at equal total optimizer steps and equal
seeds (same data order, noise and timestep draws per seed):

* Table 8 (stage 1): vanilla LoRA (n = 1) at rank r and 8r; TSM fostering with n = 2, 4, 8, 16 at rank r
  (per-sample routing, so expert i of n sees about 1/n of the samples: DESIGN.md section 7);
* Table 11 (stage 2): the assembled asymmetric [8, 1] (core n = 8 ungated, context n = 1 gated) and the
  symmetric baseline (both gated, no core), routers trained on top of the n = 8 and n = 1 files above.

and scores every file with one fixed held-out draw (``tsm_trainer.evaluation``): the denoising loss per
timestep interval on fresh target-domain renders, and the attribute score of samples for the target
combinations held out of the training images (``tsm_trainer.demo.attribute_score``). Writes
``results.md`` (tables: mean +- sd over seeds, and the change against vanilla LoRA r paired by seed),
``results.json``, ``loss_vs_t.png`` and ``samples.png`` to --output_dir. Training files are kept, and a
rerun skips the runs whose file exists (an interrupted benchmark continues).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = dict(seeds=[0, 1, 2], steps=1500, stage2_steps=750, score_seeds=4)
QUICK = dict(seeds=[0], steps=400, stage2_steps=200, score_seeds=2)


def stage1_runs(rank: int) -> list[dict]:
    """Table 8's rows: (key, n, rank)."""
    runs = [dict(key=f"lora_r{rank}", n=1, rank=rank), dict(key=f"lora_r{8 * rank}", n=1, rank=8 * rank)]
    return runs + [dict(key=f"tsm_n{n}", n=n, rank=rank) for n in (2, 4, 8, 16)]


STAGE2 = [dict(key="tsm_8+1_asym", mixture="asymmetric"), dict(key="tsm_1,8_sym", mixture="symmetric")]


def write_data(folder: str, n_train: int, n_heldout: int) -> tuple[str, str]:
    """Training images of the target domain without its held-out combinations, and fresh held-out renders."""
    from tsm_trainer.data import write_dataset_config
    from tsm_trainer.demo import shapes
    from tsm_trainer.demo.attribute_score import heldout_combos

    tomls = []
    for name, n, seed, exclude in (("train", n_train, 1, {shapes.combo(a) for a in heldout_combos()}),
                                   ("heldout", n_heldout, 99, set())):
        images = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(images, "attributes.jsonl")):
            shapes.write_dataset(images, n, "target", seed, exclude=exclude)
        tomls.append(write_dataset_config(os.path.join(folder, f"{name}.toml"), images, resolution=64, batch_size=8))
    return tomls[0], tomls[1]


def train(args, base: str, toml: str, seed: int, key: str, log, **overrides) -> tuple[str, float]:
    """Train one configuration unless its file exists; returns (path, seconds)."""
    from tsm_trainer.training.cli import build
    from tsm_trainer.training.config import TrainConfig

    out = os.path.join(args.output_dir, f"seed{seed}")
    path = os.path.join(out, f"{key}.safetensors")
    if os.path.isfile(path):
        return path, 0.0
    rank = overrides.pop("network_dim", args.rank)
    config = TrainConfig(pretrained_model_name_or_path=base, dataset_config=toml, output_dir=out, output_name=key,
                         learning_rate=args.learning_rate, network_dim=rank, network_alpha=rank, network_train_unet_only=True,
                         cache_latents_to_disk=True, cache_dir=os.path.join(args.output_dir, "latents"), seed=seed,
                         **overrides)
    start = time.time()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars and library warnings of 24 runs
        build(config, log=lambda m: None).run()
    seconds = time.time() - start
    log(f"  seed {seed} {key:<14} {config.max_train_steps} steps in {seconds:.0f} s")
    return path, seconds


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: list[float], fmt: str = "{:.5f}", scale: float = 1.0) -> str:
    mean, sd = summarise([v * scale for v in values])
    return (fmt + " ± " + fmt).format(mean, sd) if len(values) > 1 else fmt.format(mean)


def tables(results: dict, rank: int, steps: int, stage2_steps: int) -> str:
    """Markdown tables shaped like the paper's Tables 8 and 11, plus the per-interval breakdown."""
    from tsm_trainer.intervals import interval_timestep_range

    ref = f"lora_r{rank}"
    seeds = sorted(results["per_seed"], key=int)

    def col(key, field):
        return [results["per_seed"][s][key][field] for s in seeds if key in results["per_seed"][s]]

    def delta(key):  # % change of the mean held-out loss against vanilla LoRA r, paired by seed
        return [100 * (results["per_seed"][s][key]["mean_loss"] / results["per_seed"][s][ref]["mean_loss"] - 1)
                for s in seeds]

    def scores(key):
        return [pm([v[k] for v in col(key, "attribute_score")], "{:.1f}", 100) for k in ("colour", "shape", "background", "all")]

    head = "| held-out loss | Δ vs LoRA r=%d (paired) | colour %% | shape %% | background %% | all %% |" % rank
    lines = [f"**Table 8 (stage 1).** {steps} optimizer steps (batch 8) for every row; n = 1 is vanilla LoRA. "
             f"Mean ± sd over {len(seeds)} seed(s).", "",
             "| n | r | steps per expert " + head, "|---|---|---" + "|---" * 6 + "|"]
    base = results.get("base_model")
    if base:
        lines.append(f"| base model | - | - | {base['mean_loss']:.5f} | "
                     f"{100 * (base['mean_loss'] / statistics.fmean(col(ref, 'mean_loss')) - 1):+.1f}% | "
                     + " | ".join(f"{100 * base['attribute_score'][k]:.1f}" for k in ("colour", "shape", "background", "all"))
                     + " |")
    present = set(results["per_seed"][seeds[0]])
    for run in [r for r in stage1_runs(rank) if r["key"] in present]:
        key = run["key"]
        lines.append(f"| {run['n']} | {run['rank']} | ~{steps // run['n']} | {pm(col(key, 'mean_loss'))} | "
                     f"{pm(delta(key), '{:+.2f}')}% | " + " | ".join(scores(key)) + " |")
    lines += ["", f"**Table 11 (stage 2).** Routers trained {stage2_steps} more steps on the frozen n = 8 and n = 1 "
                  f"experts of the same seed.", "",
              "| n_core | n_context " + head, "|---|---" + "|---" * 6 + "|"]
    for n_core, n_ctx, key in (("8", "-", "tsm_n8"), ("-", "1,8", "tsm_1,8_sym"), ("8", "1", "tsm_8+1_asym")):
        if key not in present:
            continue
        lines.append(f"| {n_core} | {n_ctx} | {pm(col(key, 'mean_loss'))} | {pm(delta(key), '{:+.2f}')}% | "
                     + " | ".join(scores(key)) + " |")
    heads = [f"[{lo},{hi})" for lo, hi in (interval_timestep_range(i, 8) for i in range(8))]
    lines += ["", f"**Per timestep interval.** Held-out loss change against LoRA r={rank}, paired by seed "
                  f"(mean over seeds, %; negative = better).", "",
              "| model | " + " | ".join(heads) + " |", "|---" * 9 + "|"]
    for key in [r["key"] for r in stage1_runs(rank) + STAGE2 if r["key"] != ref and r["key"] in present]:
        cells = []
        for i in range(8):
            cells.append(statistics.fmean(100 * (results["per_seed"][s][key]["interval_loss"][i]
                                                 / results["per_seed"][s][ref]["interval_loss"][i] - 1) for s in seeds))
        lines.append(f"| {key} | " + " | ".join(f"{c:+.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 400 steps (about 4 min)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    p.add_argument("--steps", type=int, help="optimizer steps of every stage-1 run (default 1500; quick 400)")
    p.add_argument("--stage2_steps", type=int, help="router steps of the stage-2 runs (default steps / 2)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (the wide vanilla run uses 8r)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=320, help="training images (held-out combinations excluded)")
    p.add_argument("--heldout_images", type=int, default=80)
    p.add_argument("--score_seeds", type=int, help="sampling seeds of the attribute score (default 4; quick 2)")
    p.add_argument("--sample_steps", type=int, default=20, help="DDIM steps of the attribute score's samples")
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="run only these rows (e.g. tsm_n2 tsm_n8; lora_r<r>, the reference, always runs, and stage-2 "
                        "rows bring tsm_n8)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output_dir", default=os.path.join("outputs", "reproduce"))
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    seeds = args.seeds or preset["seeds"]
    steps = args.steps or preset["steps"]
    stage2_steps = args.stage2_steps or (steps // 2 if args.steps else preset["stage2_steps"])

    import torch

    from tsm_trainer.demo.attribute_score import attribute_score, heldout_combos
    from tsm_trainer.evaluation import evaluate_files, labelled_grid, plot_loss_curves
    from tsm_trainer.evaluation.heldout import heldout_batches
    from tsm_trainer.training.families import get_training_family

    torch.set_num_threads(args.threads)
    start = time.time()
    base = os.path.join(ROOT, "demo_assets", "base_model")
    os.makedirs(args.output_dir, exist_ok=True)
    train_toml, heldout_toml = write_data(os.path.join(args.output_dir, "data"), args.images, args.heldout_images)
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"training: seeds {seeds}, {steps} steps per stage-1 run, {stage2_steps} router steps per stage-2 run")
    seconds: dict[str, list[float]] = {}
    files: dict[int, dict[str, str]] = {}
    wanted = set(args.only or [r["key"] for r in stage1_runs(args.rank) + STAGE2]) | {f"lora_r{args.rank}"}  # the reference
    if wanted & {r["key"] for r in STAGE2}:
        wanted |= {"tsm_n8", f"lora_r{args.rank}"}
    for seed in seeds:
        files[seed] = {}
        for run in [r for r in stage1_runs(args.rank) if r["key"] in wanted]:
            stage = dict(tsm_stage="vanilla") if run["n"] == 1 else dict(tsm_stage="foster", tsm_scales=str(run["n"]))
            path, s = train(args, base, train_toml, seed, run["key"], log, max_train_steps=steps,
                            network_dim=run["rank"], **stage)
            files[seed][run["key"]] = path
            seconds.setdefault(run["key"], []).append(s)
        for run in [r for r in STAGE2 if r["key"] in wanted]:
            experts = f"{files[seed]['tsm_n8']},{files[seed][f'lora_r{args.rank}']}"
            path, s = train(args, base, train_toml, seed, run["key"], log, max_train_steps=stage2_steps,
                            tsm_stage="assemble", tsm_scales="8,1", tsm_mixture=run["mixture"], tsm_experts=experts)
            files[seed][run["key"]] = path
            seconds.setdefault(run["key"], []).append(s)
    train_s = time.time() - start

    log("evaluating (one fixed held-out draw for every file)")
    family = get_training_family("sd1")
    components = family.load(base)
    batches = heldout_batches(heldout_toml, log=log)
    combos = heldout_combos()
    score_seeds = [1000 + k for k in range(args.score_seeds or preset["score_seeds"])]
    prompts = [f"a {c} {s} on a {b} background" for s, c, b in
               (("circle", "pink", "white"), ("star", "cyan", "black"), ("square", "brown", "gray"),
                ("triangle", "pink", "striped"), ("cross", "cyan", "checkered"), ("star", "brown", "white"))]
    results: dict = {"config": {"seeds": seeds, "steps": steps, "stage2_steps": stage2_steps, "rank": args.rank,
                                "learning_rate": args.learning_rate, "images": args.images,
                                "heldout_images": args.heldout_images, "heldout_combos": len(combos),
                                "score_images_per_model": len(combos) * len(score_seeds)},
                     "per_seed": {}}
    curves: dict[str, list[list[float]]] = {}
    samples = {}
    for i, seed in enumerate(seeds):
        keys = list(files[seed])
        ev = evaluate_files(family, components, batches, [files[seed][k] for k in keys], keys,
                            include_base=(i == 0), bins=16, prompts=prompts if i == 0 else (),
                            sample_steps=args.sample_steps,
                            score=lambda generate: attribute_score(generate, combos, score_seeds), log=lambda m: None)
        results["per_seed"][str(seed)] = {k: {"mean_loss": ev.mean_loss(k), "interval_loss": ev.interval_losses(k),
                                              "attribute_score": ev.scores[k]} for k in keys}
        if i == 0:
            results["base_model"] = {"mean_loss": ev.mean_loss("base model"),
                                     "interval_loss": ev.interval_losses("base model"),
                                     "attribute_score": ev.scores["base model"]}
            samples = ev.samples
        for k in keys:
            curves.setdefault(k, []).append(ev.losses[k])
    results["train_seconds"] = {k: statistics.fmean(v) for k, v in seconds.items()}
    results["total_minutes"] = (time.time() - start) / 60
    results["train_minutes"] = train_s / 60

    md = tables(results, args.rank, steps, stage2_steps)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results["train_seconds"].items() if v)
    md += (f"\n\nHeld-out set: {args.heldout_images} fresh target-domain renders; one draw of noise and timesteps "
           f"(16 t-bins) for every file. Attribute score: {len(combos)} held-out combinations x "
           f"{len(score_seeds)} sampling seeds, DDIM {args.sample_steps} steps, guidance 5. Total {results['total_minutes']:.1f} min "
           f"(training {results['train_minutes']:.1f} min; mean seconds per run: {timing or 'files reused'}).\n")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    shown = [r["key"] for r in stage1_runs(args.rank) + STAGE2 if r["key"] in curves]
    mean_curves = {k: [statistics.fmean(v) for v in zip(*curves[k])] for k in shown}
    spread = {k: [summarise(list(v))[1] for v in zip(*curves[k])] for k in shown} if len(seeds) > 1 else None
    plot_loss_curves(mean_curves, family.num_train_timesteps, os.path.join(args.output_dir, "loss_vs_t.png"),
                     reference=f"lora_r{args.rank}", spread=spread,
                     title=f"held-out loss, mean of {len(seeds)} seed(s), {steps} steps")
    labelled_grid([(k, v) for k, v in samples.items()]).save(os.path.join(args.output_dir, "samples.png"))
    print("\n" + md)
    print(f"wrote {args.output_dir}/results.md, results.json, loss_vs_t.png and samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
