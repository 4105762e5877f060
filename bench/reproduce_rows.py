"""The rows of bench/reproduce.py's two suites: what each trains, on which budget.

A stage-1 row is dict(key, n, rank, mult, what, budget, **overrides): ``n`` experts (n = 1 is vanilla
LoRA) trained ``mult`` x the base steps S, with ``overrides`` (TrainConfig fields) on top of the
defaults. A stage-2 row is dict(key, core, context, mixture, what, budget): routers trained on the frozen
files of rows ``core`` (n = 8) and ``context`` (n = 1) of the same seed, listed after them.

* ``tables``: the paper's Tables 8 and 11 at equal total optimizer steps (every stage-1 row S steps).
* ``budgets`` (issue 13): both of the paper's budgets side by side. Equal total steps (S each: TSM's
  expert of scale n sees about 1/n of the samples) with the remedies (stratified batches, the
  text-encoder LoRA, a larger learning rate), and equal steps *per expert* (TSM n trained n x S, so
  each expert sees as many samples as the vanilla LoRA) next to vanilla LoRA trained as long (n x S:
  the same wall-clock time), and stage 2 on the n x S experts (the paper's main setting).
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
    return rows + [_stage2("tsm_8+1_asym", "tsm_n8", ref, "asymmetric", "stage 2 [8,1]"),
                   _stage2("tsm_1,8_sym", "tsm_n8", ref, "symmetric", "stage 2 symmetric")]


def budgets_suite(rank: int) -> list[dict]:
    """Ordered so that a partial seed already answers the main questions: equal total steps, the
    paper's budget for n = 8 and 4, the remedies, then the paper's budget for n = 2."""
    ref = reference(rank)
    rows = [_row(ref, 1, rank, "vanilla LoRA")]
    rows += [_row(f"tsm_n{n}", n, rank, f"TSM n={n}") for n in (8, 4, 2)]
    rows += [_stage2("tsm_8+1_asym", "tsm_n8", ref, "asymmetric", "stage 2 [8,1]")]
    for n in (8, 4):
        rows += [_row(f"tsm_n{n}_x{n}", n, rank, f"TSM n={n}", mult=n, budget=PER_EXPERT),
                 _row(f"{ref}_x{n}", 1, rank, f"vanilla LoRA as long as TSM n={n}", mult=n, budget=PER_EXPERT)]
        if n == 8:
            rows += [_stage2("tsm_8x8+1_asym", "tsm_n8_x8", ref, "asymmetric", "stage 2 [8,1]", PER_EXPERT),
                     _stage2("tsm_1,8x8_sym", "tsm_n8_x8", ref, "symmetric", "stage 2 symmetric", PER_EXPERT)]
    rows += [_row(f"tsm_n{n}_strat", n, rank, f"TSM n={n}, stratified batches", timestep_sampling="stratified")
             for n in (8, 4)]
    rows += [_row(f"{ref}_te", 1, rank, "vanilla LoRA + text-encoder LoRA", train_text_encoder=True),
             _row("tsm_n8_te", 8, rank, "TSM n=8 + text-encoder LoRA", train_text_encoder=True),
             _row("tsm_n8_lr3x", 8, rank, "TSM n=8, 3x learning rate", lr_mult=3.0)]
    return rows + [_row("tsm_n2_x2", 2, rank, "TSM n=2", mult=2, budget=PER_EXPERT),
                   _row(f"{ref}_x2", 1, rank, "vanilla LoRA as long as TSM n=2", mult=2, budget=PER_EXPERT)]


SUITES = {"tables": tables_suite, "budgets": budgets_suite}


def is_stage2(row: dict) -> bool:
    return "core" in row


def total_steps(row: dict, steps: int, stage2_steps: int, rows: dict[str, dict]) -> int:
    """Optimizer steps behind a row's file, counting those of the experts a stage-2 row is built on."""
    if is_stage2(row):
        return stage2_steps + sum(total_steps(rows[k], steps, stage2_steps, rows) for k in (row["core"], row["context"]))
    return row["mult"] * steps
