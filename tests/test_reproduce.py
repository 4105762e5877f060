"""bench/reproduce.py end to end at toy sizes: every row of the tables suite, the rows of the budgets
suite that differ in kind (n x S steps, stage 2 on them, stratified batches, the text-encoder LoRA),
per-row resume, and the paired statistics of its tables."""

import importlib.util
import json
import os
import sys

import pytest
from PIL import Image

from tsm_trainer.core.file_format import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--stage2_steps",
    "1",
    "--images",
    "16",
    "--heldout_images",
    "8",
    "--score_seeds",
    "1",
    "--sample_steps",
    "2",
    "--threads",
    "1",
]


def _main():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "bench", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def tables_run(tmp_path_factory):
    """The tables suite at toy sizes, 2 seeds: (output folder, its arguments, printed output)."""
    out = tmp_path_factory.mktemp("tables")
    args = ["--steps", "8", "--seeds", "0", "1", *TINY, "--output_dir", str(out), "--only", "tsm_n16", "tsm_1,8_sym"]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _main()(args) == 0
    return out, args, printed.getvalue()


def test_reproduce_runs_the_rows_asked_for_with_their_experts_and_reuses_files(tables_run, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from reproduce_rows import tables_suite

    assert [r["key"] for r in tables_suite(4)] == [
        "lora_r4",
        "lora_r32",
        "tsm_n2",
        "tsm_n4",
        "tsm_n8",
        "tsm_n16",
        "tsm_8+1_asym",
        "tsm_1,8_sym",
    ]
    out, args, printed = tables_run
    # the reference, the rows asked for and the experts of the stage-2 row, for 2 seeds
    keys = {"lora_r4", "tsm_n8", "tsm_n16", "tsm_1,8_sym"}
    assert printed.count("steps in") == 2 * len(keys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_seed"]["0"]) == keys == set(results["per_seed"]["1"])
    assert all(len(v["interval_loss"]) == 8 and len(v["losses"]) == 16 for v in results["per_seed"]["0"].values())
    table = (out / "results.md").read_text()
    for row in (
        "| tsm_n16: TSM n=16 | equal total steps | 8 | ~0 | 2 |",
        "| base model |",
        "| tsm_n16 | ",
        "| tsm_1,8_sym: stage 2 symmetric | equal total steps | 17 | frozen; routers only |",
    ):
        assert row in table, row
    assert "±" in table  # two seeds: mean ± sd
    assert Image.open(out / "loss_vs_t.png").size[0] > 600
    assert Image.open(out / "samples.png").size[1] == 5 * 64  # base + 4 configurations
    # a rerun evaluates the files it finds instead of training again
    assert _main()(args) == 0
    assert "steps in" not in capsys.readouterr().out


def test_budgets_suite_reuses_scores_trains_what_is_missing_and_resumes_per_row(tables_run, tmp_path, capsys):
    main = _main()
    args = [
        "--suite",
        "budgets",
        "--reuse",
        str(tables_run[0] / "results.json"),
        "--steps",
        "8",
        "--seeds",
        "0",
        *TINY,
        "--output_dir",
        str(tmp_path),
        "--only",
        "tsm_8+1per8_asym",
        "tsm_n4_strat",
        "lora_r4_te",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    trained = {line.split()[2]: int(line.split()[3]) for line in printed.splitlines() if "steps in" in line}
    # vanilla at S comes from the reused scores; the paper's-budget stage 2 needs the n = 8 file, so it is trained
    assert trained == {"tsm_n8": 8, "lora_r4_per8": 1, "tsm_n4_strat": 8, "lora_r4_te": 8, "tsm_8+1per8_asym": 1}
    seed = tmp_path / "seed0"
    assert any(k.startswith("lora_te") for k in load_file(str(seed / "lora_r4_te.safetensors"))[0])
    assert not any(k.startswith("lora_te") for k in load_file(str(seed / "tsm_n4_strat.safetensors"))[0])
    reused = json.loads((tables_run[0] / "results.json").read_text())["per_seed"]["0"]["lora_r4"]
    results = json.loads((tmp_path / "results.json").read_text())["per_seed"]["0"]
    assert results["lora_r4"]["reused"] and results["lora_r4"]["mean_loss"] == reused["mean_loss"]
    table = (tmp_path / "results.md").read_text()
    assert "| lora_r4 \\*: vanilla LoRA | equal total steps | 8 | 8 | 1 |" in table
    assert (
        "| lora_r4_per8: vanilla LoRA, as long as each expert of TSM n=8 | equal steps per expert | 1 | 1 | 1 |"
        in table
    )
    assert "| tsm_8+1per8_asym: stage 2 [8,1], paper's budget | equal steps per expert | 10 |" in table  # 1 + 8 + 1
    assert "| tsm_n4_strat: TSM n=4, stratified batches | equal total steps | 8 | 2 | 1 |" in table
    # per-row resume: only the row whose file is gone is trained, and only the row whose score is gone re-scored
    scored = json.loads((seed / "tsm_n4_strat.eval.json").read_text())
    os.remove(seed / "lora_r4_te.safetensors")
    os.remove(seed / "tsm_n4_strat.eval.json")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert [line.split()[2] for line in printed.splitlines() if "steps in" in line] == ["lora_r4_te"]
    assert json.loads((seed / "tsm_n4_strat.eval.json").read_text())["mean_loss"] == scored["mean_loss"]
    # --no_train writes the outputs from what exists: a row without a file or a reusable score is left
    # out, and one without a file takes the reused score even when a missing stage-2 row would need its file
    for key in ("lora_r4_te", "tsm_n8", "tsm_8+1per8_asym"):
        os.remove(seed / f"{key}.safetensors")
    assert main(args + ["--no_train"]) == 0
    assert "steps in" not in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())["per_seed"]["0"]
    assert set(results) == {"lora_r4", "tsm_n8", "lora_r4_per8", "tsm_n4_strat"} and results["tsm_n8"]["reused"]
    # the files of a folder are reused by name, so other settings are refused, naming the option
    i = args.index("--steps")
    with pytest.raises(SystemExit, match=r"config.json: the runs in this folder used steps=8, not 3; pass --steps 8"):
        main(args[: i + 1] + ["3"] + args[i + 2 :])
    # and scores are reused only from runs with the same settings
    with pytest.raises(SystemExit, match=r"--reuse .*results.json: its runs used learning_rate=0.001, not 0.002"):
        main(args + ["--learning_rate", "2e-3", "--output_dir", str(tmp_path / "other")])


def test_tables_pair_each_row_with_the_reference_of_its_seed():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from reproduce_rows import budgets_suite
    from reproduce_tables import interval_table, loss_delta, score_delta, summary_table

    def row(loss, score):
        return {
            "mean_loss": loss,
            "interval_loss": [loss] * 8,
            "attribute_score": dict.fromkeys(("colour", "shape", "background", "all"), score),
        }

    results = {
        "per_seed": {
            "0": {"lora_r4": row(1.0, 0.2), "tsm_n8": row(0.9, 0.3), "lora_r4_per8": row(1.2, 0.1)},
            "1": {"lora_r4": row(2.0, 0.1), "tsm_n8": row(1.9, 0.4)},
            "2": {"lora_r4": row(3.0, 0.2)},
        }
    }  # partial seeds: rows not run yet
    assert loss_delta(results, "tsm_n8", "lora_r4") == pytest.approx([-10.0, -5.0])
    assert score_delta(results, "tsm_n8", "lora_r4") == pytest.approx([10.0, 30.0])
    table = summary_table(results, budgets_suite(4), "lora_r4", 80, 40)
    assert "| tsm_n8: TSM n=8 | equal total steps | 80 | ~10 | 2 | 1.40000 ± 0.70711 | -7.50 ± 3.54% |" in table
    assert "| 35.0 ± 7.1 | +20.0 ± 14.1 |" in table
    assert "| lora_r4: vanilla LoRA | equal total steps | 80 | 80 | 3 | 2.00000 ± 1.00000 | +0.00 ± 0.00% |" in table
    assert table.rstrip().endswith(
        "| lora_r4_per8: vanilla LoRA, as long as each expert of TSM n=8 | equal steps per "
        "expert | 10 | 10 | 1 | 1.20000 | +20.00% | 10.0 | 10.0 | 10.0 | 10.0 | -10.0 |"
    )
    assert "tsm_n2" not in table  # rows without results are left out
    assert (
        interval_table(results, ["lora_r4", "tsm_n8"], "lora_r4").splitlines()[-1]
        == "| tsm_n8 | " + " | ".join(["-7.5"] * 8) + " |"
    )


def test_the_start_up_budget_print_states_the_measured_rule():
    from tsm_trainer.training.config import TrainConfig
    from tsm_trainer.training.loop import describe_budget

    # 40 batches per epoch (320 images, batch 8), as the demo world; 1500 steps = 37.5 epochs
    def text(scales, steps=1500, **kw):
        return describe_budget(TrainConfig(tsm_scales=scales, max_train_steps=steps, **kw), 8, 40)

    assert (
        text("2")
        == "1500 steps x batch 8: 12000 samples, about 6000 per expert (1/2 each), 18.8 epochs of the data per expert"
    )
    assert text("8").endswith(
        ", 4.7 epochs of the data per expert; on the demo world TSM beat vanilla LoRA at equal "
        "steps only from ~10 epochs per expert (README, Which to train): --tsm_scales 2 fits this budget"
    )
    assert text("4", steps=400).endswith("--tsm_stage vanilla fits this budget")  # 10 epochs in all
    assert text("8", gradient_accumulation_steps=8).endswith(", 37.5 epochs of the data per expert")
    assert "epochs" not in describe_budget(TrainConfig(tsm_scales="8"), 8)  # unknown dataset size: no claim
    assert "epochs" not in text("1", tsm_stage="vanilla")
