"""Markdown tables of bench/reproduce.py's results: mean ± sd over seeds, and each row's change
against the reference (vanilla LoRA r) paired by seed.

``results["per_seed"][seed][key]``: {"mean_loss", "interval_loss" (8 floats), "attribute_score"
{"colour", "shape", "background", "all"} (fractions)}; a row may be missing from some seeds (a
partial run), and then is summarised over the seeds that have it and its reference.
"""

from __future__ import annotations

import statistics

from reproduce_rows import is_stage2, total_steps

ATTRIBUTES = ("colour", "shape", "background", "all")


def pm(values: list[float], fmt: str = "{:.5f}") -> str:
    """'mean ± sd' (sample sd), or the value alone for one seed, or '-' for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.fmean(values)) + " ± " + fmt.replace("+", "").format(statistics.stdev(values))


def paired(results: dict, key: str, ref: str) -> list[str]:
    """The seeds that have both ``key`` and ``ref``, in order."""
    return [
        s
        for s in sorted(results["per_seed"], key=int)
        if key in results["per_seed"][s] and ref in results["per_seed"][s]
    ]


def loss_delta(results: dict, key: str, ref: str) -> list[float]:
    """% change of the mean held-out loss against ``ref``, one value per paired seed."""
    per = results["per_seed"]
    return [100 * (per[s][key]["mean_loss"] / per[s][ref]["mean_loss"] - 1) for s in paired(results, key, ref)]


def score_delta(results: dict, key: str, ref: str, attribute: str = "all") -> list[float]:
    """Change of an attribute score against ``ref`` in percentage points, one value per paired seed."""
    per = results["per_seed"]
    return [
        100 * (per[s][key]["attribute_score"][attribute] - per[s][ref]["attribute_score"][attribute])
        for s in paired(results, key, ref)
    ]


def summary_table(results: dict, rows: list[dict], ref: str, steps: int, stage2_steps: int) -> str:
    """One line per row present in any seed: its budget, the optimizer steps behind its file, held-out
    loss and attribute scores (mean ± sd over seeds) and both paired against ``ref``. A key marked with an asterisk
    took its scores from an earlier results file (``--reuse``)."""
    per = results["per_seed"]
    by_key = {r["key"]: r for r in rows}
    lines = [
        f"| row | budget | optimizer steps | batches per expert | seeds | held-out loss | Δ loss vs {ref} (paired) "
        f"| colour % | shape % | background % | all % | Δ all vs {ref} (paired, points) |",
        "|---" * 12 + "|",
    ]
    base = results.get("base_model")
    if base and any(ref in v for v in per.values()):
        ref_loss = statistics.fmean(v[ref]["mean_loss"] for v in per.values() if ref in v)
        lines.append(
            f"| base model | - | 0 | - | - | {base['mean_loss']:.5f} | "
            f"{100 * (base['mean_loss'] / ref_loss - 1):+.1f}% | "
            + " | ".join(f"{100 * base['attribute_score'][a]:.1f}" for a in ATTRIBUTES)
            + " | - |"
        )
    for row in rows:
        key = row["key"]
        seeds = [s for s in sorted(per, key=int) if key in per[s]]
        if not seeds:
            continue
        if is_stage2(row):
            experts = "frozen; routers only"
        else:
            experts = (
                f"{'' if row.get('timestep_sampling') == 'stratified' or row['n'] == 1 else '~'}"
                f"{int(row['mult'] * steps) // row['n']}"
            )
        scores = [pm([100 * per[s][key]["attribute_score"][a] for s in seeds], "{:.1f}") for a in ATTRIBUTES]
        mark = " \\*" if all(per[s][key].get("reused") for s in seeds) else ""
        lines.append(
            f"| {key}{mark}: {row['what']} | {row['budget']} | {total_steps(row, steps, stage2_steps, by_key)} | "
            f"{experts} | {len(seeds)} | {pm([per[s][key]['mean_loss'] for s in seeds])} | "
            f"{pm(loss_delta(results, key, ref), '{:+.2f}')}% | "
            + " | ".join(scores)
            + f" | {pm(score_delta(results, key, ref), '{:+.1f}')} |"
        )
    return "\n".join(lines)


def interval_table(results: dict, keys: list[str], ref: str, n: int = 8) -> str:
    """Held-out loss change against ``ref`` per timestep interval, paired by seed (mean over seeds, %)."""
    from tsm_trainer.core.intervals import interval_timestep_range

    per = results["per_seed"]
    heads = [f"[{lo},{hi})" for lo, hi in (interval_timestep_range(i, n) for i in range(n))]
    lines = ["| row | " + " | ".join(heads) + " |", "|---" * (n + 1) + "|"]
    for key in keys:
        seeds = paired(results, key, ref)
        if key == ref or not seeds:
            continue
        cells = [
            statistics.fmean(
                100 * (per[s][key]["interval_loss"][i] / per[s][ref]["interval_loss"][i] - 1) for s in seeds
            )
            for i in range(n)
        ]
        lines.append(f"| {key} | " + " | ".join(f"{c:+.1f}" for c in cells) + " |")
    return "\n".join(lines)
