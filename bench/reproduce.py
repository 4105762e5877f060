"""A small-scale reproduction of the paper's ablations on the demo world, and of its two budgets.

Usage (from the repository root)::

    python bench/reproduce.py                    # Tables 8 and 11, 3 seeds (about 45 min on 2 CPU cores)
    python bench/reproduce.py --quick            # 1 seed, fewer steps (about 4 min)
    python bench/reproduce.py --suite budgets    # both budgets and the remedies (issue 13)

Fine-tunes the committed demo base model (demo_assets/base_model) on the target domain (shapes in
pink, cyan, brown: colours and words it never saw), equal seeds giving the same data order, noise and
timestep draws. The rows of each suite are in bench/reproduce_rows.py:

* ``tables``: Table 8 (stage 1) at equal total optimizer steps: vanilla LoRA (n = 1) at rank r and 8r,
  TSM fostering with n = 2, 4, 8, 16 at rank r (per-sample routing, so expert i of n sees about 1/n of
  the samples: docs/design.md section 7); Table 11 (stage 2): the assembled asymmetric [8, 1] and the
  symmetric baseline, routers trained on the n = 8 and n = 1 files.
* ``budgets``: equal total steps and equal steps per expert (TSM n trained n x S, next to vanilla LoRA
  trained as long), stage 2 on both, and the remedies at equal total steps (stratified batches, the
  text-encoder LoRA, a 3x learning rate).

Every file is scored with one fixed held-out draw (``tsm_trainer.evaluation``): the denoising loss per
timestep interval on fresh target-domain renders, and the attribute score of samples for the target
combinations held out of the training images (``demo_world.attribute_score``). After every row it
rewrites ``results.md`` (mean ± sd over seeds, and the change against vanilla LoRA r paired by seed),
``results.json``, ``loss_vs_t.png`` and ``samples.png`` in --output_dir. Trained files and their scores
(``seed<k>/<row>.eval.json``) are kept: a rerun with the same settings trains and scores only what is
missing, so an interrupted run continues where it stopped.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reproduce_rows import SUITES, is_stage2, reference  # noqa: E402
from reproduce_tables import interval_table, summary_table  # noqa: E402

PRESETS = {  # (suite, quick) -> defaults
    ("tables", False): dict(seeds=[0, 1, 2], steps=1500, score_seeds=4),
    ("tables", True): dict(seeds=[0], steps=400, score_seeds=2),
    # S = 1500 as the tables suite, whose committed scores it reuses for the rows they share
    ("budgets", False): dict(
        seeds=[0, 1, 2],
        steps=1500,
        score_seeds=4,
        reuse=os.path.join(ROOT, "docs", "results", "reproduce_results.json"),
    ),
    ("budgets", True): dict(seeds=[0], steps=400, score_seeds=2),
}
CONFIG_KEYS = (
    "suite",
    "steps",
    "stage2_steps",
    "rank",
    "learning_rate",
    "images",
    "heldout_images",
    "score_seeds",
    "sample_steps",
)
PROMPTS = [
    f"a {c} {s} on a {b} background"
    for s, c, b in (
        ("circle", "pink", "white"),
        ("star", "cyan", "black"),
        ("square", "brown", "gray"),
        ("triangle", "pink", "striped"),
        ("cross", "cyan", "checkered"),
        ("star", "brown", "white"),
    )
]


def write_data(folder: str, n_train: int, n_heldout: int) -> tuple[str, str]:
    """Training images of the target domain without its held-out combinations, and fresh held-out renders."""
    from demo_world import shapes
    from demo_world.attribute_score import heldout_combos
    from tsm_trainer.data import write_dataset_config

    tomls = []
    for name, n, seed, exclude in (
        ("train", n_train, 1, {shapes.combo(a) for a in heldout_combos()}),
        ("heldout", n_heldout, 99, set()),
    ):
        images = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(images, "attributes.jsonl")):
            shapes.write_dataset(images, n, "target", seed, exclude=exclude)
        tomls.append(write_dataset_config(os.path.join(folder, f"{name}.toml"), images, resolution=64, batch_size=8))
    return tomls[0], tomls[1]


def check_config(output_dir: str, config: dict) -> None:
    """Files in ``output_dir`` are reused by key, so they must come from the same settings."""
    path = os.path.join(output_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for k in CONFIG_KEYS:
            if k in old and old[k] != config[k]:
                raise SystemExit(
                    f"{path}: the runs in this folder used {k}={old[k]!r}, not {config[k]!r}; "
                    f"pass --{k} {old[k]} to continue them, or another --output_dir"
                )
    with open(path, "w") as f:
        json.dump({k: config[k] for k in CONFIG_KEYS}, f, indent=2)


def load_reused(path: str, config: dict, base_model: dict) -> dict:
    """{seed: {key: scores}} of a results.json written by this script with the same settings and the same
    evaluation (its base model's held-out loss must match ours), for rows without a file of their own."""
    with open(path) as f:
        old = json.load(f)
    for k in ("steps", "rank", "learning_rate", "images", "heldout_images"):
        if old["config"].get(k) != config[k]:
            raise SystemExit(
                f"--reuse {path}: its runs used {k}={old['config'].get(k)!r}, not {config[k]!r}; "
                f"pass the same settings or --reuse ''"
            )
    if old["config"].get("score_images_per_model") != config["score_images_per_model"]:
        raise SystemExit(
            f"--reuse {path}: its attribute scores used {old['config'].get('score_images_per_model')} "
            f"samples per model, this run {config['score_images_per_model']}: pass the same --score_seeds"
        )
    if abs(old["base_model"]["mean_loss"] / base_model["mean_loss"] - 1) > 1e-6:
        raise SystemExit(
            f"--reuse {path}: its base-model held-out loss {old['base_model']['mean_loss']:.6f} differs from "
            f"this run's {base_model['mean_loss']:.6f}: another evaluation draw; rerun without --reuse"
        )
    return old["per_seed"]


def train(args, base: str, toml: str, seed: int, key: str, log, **overrides) -> tuple[str, float]:
    """Train one configuration unless its file exists; returns (path, seconds; 0 when the file existed)."""
    from tsm_trainer.training.build import build
    from tsm_trainer.training.config import TrainConfig

    out = os.path.join(args.output_dir, f"seed{seed}")
    path = os.path.join(out, f"{key}.safetensors")
    if os.path.isfile(path):
        return path, 0.0
    rank = overrides.pop("network_dim", args.rank)
    options = dict(
        pretrained_model_name_or_path=base,
        dataset_config=toml,
        output_dir=out,
        output_name=key,
        learning_rate=args.learning_rate,
        network_dim=rank,
        network_alpha=rank,
        network_train_unet_only=True,
        cache_latents_to_disk=True,
        cache_dir=os.path.join(args.output_dir, "latents"),
        seed=seed,
    )
    config = TrainConfig(**{**options, **overrides})  # a row may turn the text-encoder LoRA on
    start = time.time()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars and library warnings of many runs
        build(config, log=lambda m: None).run()
    seconds = time.time() - start
    log(f"  seed {seed} {key:<16} {config.max_train_steps} steps in {seconds:.0f} s")
    return path, seconds


def run_overrides(row: dict, steps: int, stage2_steps: int, files: dict[str, str]) -> dict:
    """TrainConfig fields of one row (stage-2 rows name the files of their experts)."""
    if is_stage2(row):
        return dict(
            max_train_steps=stage2_steps,
            tsm_stage="assemble",
            tsm_scales="8,1",
            tsm_mixture=row["mixture"],
            tsm_experts=f"{files[row['core']]},{files[row['context']]}",
        )
    extra = {k: v for k, v in row.items() if k not in ("key", "n", "rank", "mult", "what", "budget")}
    stage = dict(tsm_stage="vanilla") if row["n"] == 1 else dict(tsm_stage="foster", tsm_scales=str(row["n"]))
    return dict(max_train_steps=int(row["mult"] * steps), network_dim=row["rank"], **stage, **extra)


class Scorer:
    """Scores files against one fixed held-out draw, caching each result next to its file
    (``<key>.eval.json``, plus ``<key>.samples.png`` when samples are asked for), so that an
    interrupted run re-scores only what is new. Components load on first use."""

    def __init__(self, args, base: str, heldout_toml: str, score_seeds: int, log):
        self.args, self.base, self.heldout_toml, self.log = args, base, heldout_toml, log
        self.score_seeds = [1000 + k for k in range(score_seeds)]
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from tsm_trainer.evaluation.heldout import heldout_batches
            from tsm_trainer.families import get_training_family

            family = get_training_family("sd1")
            self._loaded = family, family.load(self.base), heldout_batches(self.heldout_toml, log=lambda m: None)
        return self._loaded

    def score(self, path: str | None, stem: str, samples: bool, train_seconds: float = 0.0) -> dict:
        """{"mean_loss", "interval_loss", "losses" (16 bins), "attribute_score", "train_seconds"} of the
        file at ``path`` (None: the base model), cached at ``stem``.eval.json."""
        from PIL import Image

        from demo_world.attribute_score import attribute_score, heldout_combos
        from tsm_trainer.evaluation import evaluate_files

        cache, strip = stem + ".eval.json", stem + ".samples.png"
        if (
            os.path.isfile(cache)
            and (not samples or os.path.isfile(strip))
            and (path is None or os.path.getmtime(cache) >= os.path.getmtime(path))
        ):
            with open(cache) as f:
                return json.load(f)
        family, components, batches = self._load()
        combos = heldout_combos()
        ev = evaluate_files(
            family,
            components,
            batches,
            [path] if path else [],
            ["row"] if path else None,
            include_base=path is None,
            bins=16,
            prompts=PROMPTS if samples else (),
            sample_steps=self.args.sample_steps,
            score=lambda generate: attribute_score(generate, combos, self.score_seeds),
            log=lambda m: None,
        )
        label = "row" if path else "base model"
        result = {
            "mean_loss": ev.mean_loss(label),
            "interval_loss": ev.interval_losses(label),
            "losses": ev.losses[label],
            "attribute_score": ev.scores[label],
            "train_seconds": train_seconds,
        }
        if samples:
            images = ev.samples[label]
            row = Image.new("RGB", (sum(i.width for i in images), images[0].height))
            for k, image in enumerate(images):
                row.paste(image, (k * images[0].width, 0))
            row.save(strip)
        with open(cache + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(cache + ".tmp", cache)
        return result


def load_strip(stem: str) -> list:
    """The sample images saved by :meth:`Scorer.score`, split back into squares."""
    from PIL import Image

    strip = Image.open(stem + ".samples.png").convert("RGB")
    h = strip.height
    return [strip.crop((k * h, 0, (k + 1) * h, h)) for k in range(strip.width // h)]


def write_outputs(args, results: dict, rows: list[dict], steps: int, stage2_steps: int, samples: dict) -> str:
    """results.md / .json, loss_vs_t.png and samples.png of everything scored so far; returns the markdown."""
    from tsm_trainer.evaluation import labelled_grid, plot_loss_curves

    ref = reference(args.rank)
    seeds = sorted(results["per_seed"], key=int)
    present = [r["key"] for r in rows if any(r["key"] in results["per_seed"][s] for s in seeds)]
    md = (
        f"Base steps S = {steps} (batch 8), stage 2: {stage2_steps} router steps; mean ± sd over the seeds in "
        f"the 'seeds' column ({', '.join(seeds)}); Δ columns are paired by seed against {ref}."
        + (
            f" Rows marked \\* take their scores from {results['config']['reused_from']}."
            if "reused_from" in results["config"]
            else ""
        )
        + "\n\n"
        + summary_table(results, rows, ref, steps, stage2_steps)
        + "\n\n**Per timestep interval.** Held-out loss change against "
        + ref
        + ", paired by seed (mean over seeds, %; negative = better).\n\n"
        + interval_table(results, present, ref)
    )
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results["train_seconds"].items() if v)
    md += (
        f"\n\nHeld-out set: {args.heldout_images} fresh target-domain renders; one draw of noise and timesteps "
        f"(16 t-bins) for every file. Attribute score: {results['config']['heldout_combos']} held-out combinations x "
        f"{len(results['config']['score_seeds'])} sampling seeds, DDIM {args.sample_steps} steps, guidance 5. "
        f"Mean training seconds per run: {timing or 'files reused'}.\n"
    )
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.output_dir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(args.output_dir, "results.json.tmp"), os.path.join(args.output_dir, "results.json"))
    scored = [results["per_seed"][s][k] for s in seeds for k in present if k in results["per_seed"][s]]
    field = "losses" if all("losses" in v for v in scored) else "interval_loss"  # reused rows: 8 intervals only
    per_bin = {k: [results["per_seed"][s][k][field] for s in seeds if k in results["per_seed"][s]] for k in present}
    curves = {k: [statistics.fmean(v) for v in zip(*b)] for k, b in per_bin.items() if b}
    spread = {k: [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*b)] for k, b in per_bin.items() if b}
    if ref in curves and len(curves) > 1:
        plot_loss_curves(
            curves,
            1000,
            os.path.join(args.output_dir, "loss_vs_t.png"),
            reference=ref,
            spread=spread,
            title=f"held-out loss, mean of {len(seeds)} seed(s), S = {steps} steps",
        )
    if samples:
        labelled_grid(list(samples.items())).save(os.path.join(args.output_dir, "samples.png"))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="tables",
        help="tables: the paper's Tables 8 and 11 at equal total steps; budgets: both budgets and the "
        "remedies (issue 13)",
    )
    p.add_argument("--quick", action="store_true", help="1 seed, fewer steps (tables: 400, about 4 min)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    p.add_argument("--steps", type=int, help="base optimizer steps S (tables: 1500, budgets: 250; quick 400 / 100)")
    p.add_argument("--stage2_steps", type=int, help="router steps of the stage-2 runs (default S / 2)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (the wide vanilla run uses 8r)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=320, help="training images (held-out combinations excluded)")
    p.add_argument("--heldout_images", type=int, default=80)
    p.add_argument("--score_seeds", type=int, help="sampling seeds of the attribute score (default 4; quick 2)")
    p.add_argument("--sample_steps", type=int, default=20, help="DDIM steps of the attribute score's samples")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="KEY",
        help="run only these rows (e.g. tsm_n2 tsm_n8); the reference lora_r<r> always runs, and a "
        "stage-2 row brings the rows it is built on",
    )
    p.add_argument(
        "--reuse",
        help="a results.json of this script with the same settings: rows without a file in "
        "--output_dir take their scores from it (budgets: the committed docs/results/reproduce_results.json; "
        "'' for none)",
    )
    p.add_argument(
        "--no_train",
        action="store_true",
        help="train nothing: write the outputs from the files and scores already in --output_dir",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output_dir", help="default outputs/reproduce (tables) or outputs/reproduce-budgets")
    args = p.parse_args(argv)
    preset = PRESETS[(args.suite, args.quick)]
    seeds = args.seeds or preset["seeds"]
    args.steps = steps = args.steps or preset["steps"]
    args.stage2_steps = stage2_steps = args.stage2_steps or steps // 2
    args.score_seeds = args.score_seeds or preset["score_seeds"]
    args.reuse = preset.get("reuse") if args.reuse is None else args.reuse
    args.output_dir = args.output_dir or os.path.join(
        "outputs", "reproduce" + ("" if args.suite == "tables" else "-budgets")
    )
    rows = SUITES[args.suite](args.rank)
    by_key = {r["key"]: r for r in rows}
    wanted = set(args.only or by_key) | {reference(args.rank)}
    unknown = wanted - set(by_key)
    if unknown:
        p.error(f"--only: no row {sorted(unknown)} in suite {args.suite} (rows: {', '.join(by_key)})")
    for row in rows[::-1]:  # a stage-2 row needs its experts
        if row["key"] in wanted and is_stage2(row):
            wanted |= {row["core"], row["context"]}
    rows = [r for r in rows if r["key"] in wanted]

    import torch

    from demo_world.attribute_score import heldout_combos

    torch.set_num_threads(args.threads)
    base = os.path.join(ROOT, "demo_assets", "base_model")
    os.makedirs(args.output_dir, exist_ok=True)
    check_config(args.output_dir, vars(args))
    train_toml, heldout_toml = write_data(os.path.join(args.output_dir, "data"), args.images, args.heldout_images)
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(
        f"suite {args.suite}: seeds {seeds}, S = {steps} base steps, {stage2_steps} router steps per stage-2 run; "
        f"rows {', '.join(r['key'] for r in rows)}"
    )
    scorer = Scorer(args, base, heldout_toml, args.score_seeds, log)
    results: dict = {
        "config": {
            "suite": args.suite,
            "seeds": seeds,
            "steps": steps,
            "stage2_steps": stage2_steps,
            "rank": args.rank,
            "learning_rate": args.learning_rate,
            "images": args.images,
            "heldout_images": args.heldout_images,
            "heldout_combos": len(heldout_combos()),
            "score_seeds": scorer.score_seeds,
            "sample_steps": args.sample_steps,
            "score_images_per_model": len(heldout_combos()) * len(scorer.score_seeds),
        },
        "per_seed": {},
    }
    results["base_model"] = scorer.score(None, os.path.join(args.output_dir, "base_model"), samples=True)
    reused = load_reused(args.reuse, results["config"], results["base_model"]) if args.reuse else {}
    if args.reuse:
        results["config"]["reused_from"] = os.path.relpath(args.reuse, ROOT)
    samples = {"base model": load_strip(os.path.join(args.output_dir, "base_model"))}
    seconds: dict[str, list[float]] = {}
    md = ""
    for seed in seeds:
        stems = {r["key"]: os.path.join(args.output_dir, f"seed{seed}", r["key"]) for r in rows}
        reusable = {k: v for k, v in reused.get(str(seed), {}).items() if k in stems}
        # rows to train: no file and no reusable score; the experts a stage-2 row to train needs are trained too
        todo = {k for k in stems if not os.path.isfile(stems[k] + ".safetensors") and k not in reusable}
        if not args.no_train:
            todo |= {
                d
                for r in rows
                if r["key"] in todo and is_stage2(r)
                for d in (r["core"], r["context"])
                if not os.path.isfile(stems[d] + ".safetensors")
            }
        files: dict[str, str] = {}
        for row in rows:
            key = row["key"]
            if key not in todo and not os.path.isfile(stems[key] + ".safetensors"):
                scored = dict(reusable[key], reused=True)
            elif args.no_train and not os.path.isfile(stems[key] + ".safetensors"):
                continue
            else:
                path, s = train(
                    args, base, train_toml, seed, key, log, **run_overrides(row, steps, stage2_steps, files)
                )
                files[key] = path
                scored = scorer.score(path, stems[key], samples=seed == seeds[0], train_seconds=s)
            results["per_seed"].setdefault(str(seed), {})[key] = scored
            if scored.get("train_seconds"):
                seconds.setdefault(key, []).append(scored["train_seconds"])
            if seed == seeds[0] and os.path.isfile(stems[key] + ".samples.png"):
                samples[key] = load_strip(stems[key])
            results["train_seconds"] = {k: statistics.fmean(v) for k, v in seconds.items()}
            md = write_outputs(
                args, results, rows, steps, stage2_steps, samples
            )  # after every row: resumable, readable
        log(f"seed {seed} done: {args.output_dir}/results.json")
    print("\n" + md)
    print(f"wrote {args.output_dir}/results.md, results.json, loss_vs_t.png and samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
