"""bench/reproduce.py end to end at toy sizes: every row of the tables suite, the rows of the budgets
suite that differ in kind (n x S steps, stage 2 on them, stratified batches, the text-encoder LoRA),
per-row resume, and the paired statistics of its tables."""

import importlib.util
import json
import os
import sys

import pytest
from PIL import Image

from tsm_trainer.file_format import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--stage2_steps", "1", "--images", "16", "--heldout_images", "8", "--score_seeds", "1", "--sample_steps", "2",
        "--threads", "1"]


def _main():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "bench", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_reproduce_runs_every_configuration_and_reuses_files(tmp_path, capsys):
    main = _main()
    args = ["--steps", "2", "--seeds", "0", "1", *TINY, "--output_dir", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("steps in") == 16  # 8 configurations x 2 seeds trained
    results = json.loads((tmp_path / "results.json").read_text())
    keys = {"lora_r4", "lora_r32", "tsm_n2", "tsm_n4", "tsm_n8", "tsm_n16", "tsm_8+1_asym", "tsm_1,8_sym"}
    assert set(results["per_seed"]["0"]) == keys == set(results["per_seed"]["1"])
    assert all(len(v["interval_loss"]) == 8 for v in results["per_seed"]["0"].values())
    table = (tmp_path / "results.md").read_text()
    for row in ("| tsm_n16: TSM n=16 | equal total steps | 2 | ~0 | 2 |", "| lora_r32: vanilla LoRA, rank 8r |",
                "| tsm_1,8_sym: stage 2 symmetric | equal total steps | 5 | frozen; routers only |", "| base model |",
                "| tsm_n16 | "):
        assert row in table, row
    assert "±" in table  # two seeds: mean ± sd
    assert Image.open(tmp_path / "loss_vs_t.png").size[0] > 600
    assert Image.open(tmp_path / "samples.png").size[1] == 9 * 64  # base + 8 configurations
    # a rerun evaluates the files it finds instead of training again
    assert main(args) == 0
    assert "steps in" not in capsys.readouterr().out


def test_budgets_suite_trains_n_times_longer_resumes_per_row_and_refuses_other_settings(tmp_path, capsys):
    main = _main()
    args = ["--suite", "budgets", "--steps", "2", "--seeds", "0", *TINY, "--output_dir", str(tmp_path),
            "--only", "tsm_8x8+1_asym", "tsm_n4_strat", "lora_r4_te"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    trained = {line.split()[2]: int(line.split()[3]) for line in printed.splitlines() if "steps in" in line}
    # the stage-2 row brings its experts: TSM n=8 at 8 x S (the paper's budget) and vanilla at S
    assert trained == {"lora_r4": 2, "tsm_n8_x8": 16, "tsm_8x8+1_asym": 1, "tsm_n4_strat": 2, "lora_r4_te": 2}
    seed = tmp_path / "seed0"
    assert any(k.startswith("lora_te") for k in load_file(str(seed / "lora_r4_te.safetensors"))[0])
    assert not any(k.startswith("lora_te") for k in load_file(str(seed / "lora_r4.safetensors"))[0])
    table = (tmp_path / "results.md").read_text()
    assert "| tsm_n8_x8: TSM n=8 | equal steps per expert | 16 | ~2 | 1 |" in table
    assert "| tsm_8x8+1_asym: stage 2 [8,1] | equal steps per expert | 19 |" in table  # 1 + 16 + 2
    assert "| tsm_n4_strat: TSM n=4, stratified batches | equal total steps | 2 | 0 |" in table
    # per-row resume: only the row whose file is gone is trained, and only the row whose score is gone re-scored
    scored = json.loads((seed / "tsm_n4_strat.eval.json").read_text())
    os.remove(seed / "lora_r4_te.safetensors")
    os.remove(seed / "tsm_n4_strat.eval.json")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert [line.split()[2] for line in printed.splitlines() if "steps in" in line] == ["lora_r4_te"]
    assert json.loads((seed / "tsm_n4_strat.eval.json").read_text())["mean_loss"] == scored["mean_loss"]
    # the files of a folder are reused by name, so other settings are refused, naming the option
    with pytest.raises(SystemExit, match=r"config.json: the runs in this folder used steps=2, not 3; pass --steps 2"):
        main(args[:3] + ["3"] + args[4:])


def test_tables_pair_each_row_with_the_reference_of_its_seed():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from reproduce_rows import budgets_suite
    from reproduce_tables import interval_table, loss_delta, score_delta, summary_table

    def row(loss, score):
        return {"mean_loss": loss, "interval_loss": [loss] * 8, "attribute_score": dict.fromkeys(
            ("colour", "shape", "background", "all"), score)}

    results = {"per_seed": {"0": {"lora_r4": row(1.0, 0.2), "tsm_n8_x8": row(0.9, 0.3)},
                            "1": {"lora_r4": row(2.0, 0.1), "tsm_n8_x8": row(1.9, 0.4)},
                            "2": {"lora_r4": row(3.0, 0.2)}}}  # a partial seed: tsm_n8_x8 not run yet
    assert loss_delta(results, "tsm_n8_x8", "lora_r4") == pytest.approx([-10.0, -5.0])
    assert score_delta(results, "tsm_n8_x8", "lora_r4") == pytest.approx([10.0, 30.0])
    table = summary_table(results, budgets_suite(4), "lora_r4", 10, 5)
    assert "| tsm_n8_x8: TSM n=8 | equal steps per expert | 80 | ~10 | 2 | 1.40000 ± 0.70711 | -7.50 ± 3.54% |" in table
    assert table.rstrip().endswith("| +20.0 ± 14.1 |")
    assert "| lora_r4: vanilla LoRA | equal total steps | 10 | 10 | 3 | 2.00000 ± 1.00000 | +0.00 ± 0.00% |" in table
    assert "tsm_n2" not in table  # rows without results are left out
    assert interval_table(results, ["lora_r4", "tsm_n8_x8"], "lora_r4").splitlines()[-1] == "| tsm_n8_x8 | " + \
        " | ".join(["-7.5"] * 8) + " |"
