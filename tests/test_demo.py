"""tools/demo.py end to end on the committed base model, with tiny step counts."""

import os

from tests.tool_scripts import tool_module


def test_demo_runs_and_prints_both_methods_side_by_side(tmp_path, capsys):
    demo = tool_module("demo")
    assert demo.main(["--steps", "4", "--images", "40", "--sample_steps", "1", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Held-out denoising loss per timestep interval") :]
    for row in ("base model", "vanilla, S/4", "TSM n=4", "vanilla, S"):
        assert row in table
    assert "[875,1000)" in table
    for name in (
        "tsm4.safetensors",
        "vanilla.safetensors",
        "vanilla_per_expert.safetensors",
        "samples_before_after.png",
    ):
        assert os.path.isfile(tmp_path / name)
