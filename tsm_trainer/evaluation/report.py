"""Text tables of an :class:`~tsm_trainer.evaluation.compare.Evaluation`."""

from __future__ import annotations

from tsm_trainer.core.intervals import interval_timestep_range
from tsm_trainer.evaluation.compare import Evaluation


def loss_table(evaluation: Evaluation, intervals: int = 8, markdown: bool = False) -> str:
    """Mean held-out loss per timestep interval and overall, one row per model; the last column is
    the mean's change against the first row."""
    heads = [
        f"[{lo},{hi})"
        for lo, hi in (interval_timestep_range(i, intervals, evaluation.num_train_timesteps) for i in range(intervals))
    ]
    labels = list(evaluation.losses)
    ref = evaluation.mean_loss(labels[0])
    rows = []
    for label in labels:
        values = evaluation.interval_losses(label, intervals)
        mean = evaluation.mean_loss(label)
        rows.append([label, *(f"{v:.4f}" for v in values), f"{mean:.5f}", f"{100 * (mean / ref - 1):+.1f}%"])
    header = ["model", *heads, "mean", f"vs {labels[0]}"]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    width = max(14, *(len(label) + 2 for label in labels))
    fmt = lambda r: f"{r[0]:<{width}}" + "".join(f"{c:>11}" for c in r[1:])  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def score_table(evaluation: Evaluation, markdown: bool = False) -> str:
    """Attribute scores (fraction correct) per model."""
    keys = ["colour", "shape", "background", "all"]
    header = ["model", *keys, "n"]
    rows = [[label, *(f"{s[k]:.1%}" for k in keys), str(s["n"])] for label, s in evaluation.scores.items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    width = max(14, *(len(r[0]) + 2 for r in rows))
    return "\n".join(f"{r[0]:<{width}}" + "".join(f"{c:>12}" for c in r[1:]) for r in [header, *rows])
