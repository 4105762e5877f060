"""The rows of bench/reproduce.py's two suites: what each trains, on which budget.

A stage-1 row is dict(key, n, rank, mult, what, budget, **overrides): ``n`` experts (n = 1 is vanilla
LoRA) trained ``mult`` x the base steps S (rounded down), with ``overrides`` (TrainConfig fields) on top of the
defaults. A stage-2 row is dict(key, core, context, mixture, what, budget): routers trained on the frozen
files of rows ``core`` (n = 8) and ``context`` (n = 1) of the same seed, listed after them.

* ``tables``: the paper's Tables 8 and 11 at equal total optimizer steps (every stage-1 row S steps).
* ``budgets`` (issue 13): both of the paper's budgets side by side. Equal total steps: every row S
  steps, so TSM's expert of scale n sees about 1/n of the samples (the tables suite's rows), and the
  remedies at that budget (stratified batches, the text-encoder LoRA). Equal steps *per expert* (the
  paper's main setting): TSM n's S steps give each expert about S / n batches, so it is compared with
  vanilla LoRA trained S / n steps (``lora_r<r>_per<n>``), and stage 2 is built on those two files.
"""

from __future__ import annotations

TOTAL, PER_EXPERT = "equal total steps", "equal steps per expert"


def _row(key, n, rank, what, mult=1, budget=TOTAL, **overrides):
    return dict(key=key, n=n, rank=rank, mult=mult, what=what, budget=budget, **overrides)


def reference(rank: int) -> str:
    """The key every row is compared with, paired by seed: vanilla LoRA rank r, S steps."""
    return f"lora_r{rank}"


def _stage2(key, core, context, mixture, what, budget=TOTAL):
    return dict(key=key, core=core, context=context, mixture=mixture, what=what, budget=budget)


def tables_suite(rank: int) -> list[dict]:
    ref = reference(rank)
    rows = [_row(ref, 1, rank, "vanilla LoRA"), _row(f"lora_r{8 * rank}", 1, 8 * rank, "vanilla LoRA, rank 8r")]
    rows += [_row(f"tsm_n{n}", n, rank, f"TSM n={n}") for n in (2, 4, 8, 16)]
    return rows + [
        _stage2("tsm_8+1_asym", "tsm_n8", ref, "asymmetric", "stage 2 [8,1]"),
        _stage2("tsm_1,8_sym", "tsm_n8", ref, "symmetric", "stage 2 symmetric"),
    ]


def budgets_suite(rank: int) -> list[dict]:
    """Ordered by what a partial run should answer first: the paper's budget (vanilla as long as each
    expert), the remedies, then stage 2 on the paper's budget. The equal-total rows are the tables
    suite's (reused from its results when given)."""
    ref = reference(rank)
    rows = [r for r in tables_suite(rank) if r["key"] not in (f"lora_r{8 * rank}", "tsm_n16")]
    rows += [
        _row(
            f"{ref}_per{n}",
            1,
            rank,
            f"vanilla LoRA, as long as each expert of TSM n={n}",
            mult=1 / n,
            budget=PER_EXPERT,
        )
        for n in (8, 4, 2)
    ]
    rows += [
        _row(f"tsm_n{n}_strat", n, rank, f"TSM n={n}, stratified batches", timestep_sampling="stratified")
        for n in (8, 4)
    ]
    rows += [
        _row(f"{ref}_te", 1, rank, "vanilla LoRA + text-encoder LoRA", network_train_unet_only=False),
        _row("tsm_n8_te", 8, rank, "TSM n=8 + text-encoder LoRA", network_train_unet_only=False),
    ]
    return rows + [
        _stage2("tsm_8+1per8_asym", "tsm_n8", f"{ref}_per8", "asymmetric", "stage 2 [8,1], paper's budget", PER_EXPERT),
        _stage2(
            "tsm_1per8,8_sym", "tsm_n8", f"{ref}_per8", "symmetric", "stage 2 symmetric, paper's budget", PER_EXPERT
        ),
    ]


SUITES = {"tables": tables_suite, "budgets": budgets_suite}


def is_stage2(row: dict) -> bool:
    return "core" in row


def total_steps(row: dict, steps: int, stage2_steps: int, rows: dict[str, dict]) -> int:
    """Optimizer steps behind a row's file, counting those of the experts a stage-2 row is built on."""
    if is_stage2(row):
        return stage2_steps + sum(
            total_steps(rows[k], steps, stage2_steps, rows) for k in (row["core"], row["context"])
        )
    return int(row["mult"] * steps)
