"""bench/reproduce.py end to end at toy sizes: every row of both tables, the outputs, and a rerun
that reuses the trained files."""

import importlib.util
import json
import os

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main():
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "bench", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_reproduce_runs_every_configuration_and_reuses_files(tmp_path, capsys):
    main = _main()
    args = ["--steps", "2", "--stage2_steps", "1", "--seeds", "0", "1", "--images", "16", "--heldout_images", "8",
            "--score_seeds", "1", "--sample_steps", "2", "--threads", "1", "--output_dir", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("steps in") == 16  # 8 configurations x 2 seeds trained
    results = json.loads((tmp_path / "results.json").read_text())
    keys = {"lora_r4", "lora_r32", "tsm_n2", "tsm_n4", "tsm_n8", "tsm_n16", "tsm_8+1_asym", "tsm_1,8_sym"}
    assert set(results["per_seed"]["0"]) == keys == set(results["per_seed"]["1"])
    assert all(len(v["interval_loss"]) == 8 for v in results["per_seed"]["0"].values())
    table = (tmp_path / "results.md").read_text()
    for row in ("| 16 | 4 | ~0 |", "| 1 | 32 |", "| - | 1,8 |", "| 8 | 1 |", "| base model |", "| tsm_n16 |"):
        assert row in table, row
    assert "±" in table  # two seeds: mean ± sd
    assert Image.open(tmp_path / "loss_vs_t.png").size[0] > 600
    assert Image.open(tmp_path / "samples.png").size[1] == 9 * 64  # base + 8 configurations
    # a rerun evaluates the files it finds instead of training again
    assert main(args) == 0
    assert "steps in" not in capsys.readouterr().out
