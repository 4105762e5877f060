"""tools/demo.py end to end on the committed base model, with tiny step counts."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_prints_both_methods_side_by_side(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "tools", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--steps", "4", "--images", "40", "--sample_steps", "1", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Held-out denoising loss per timestep interval"):]
    for row in ("base model", "vanilla, S/4", "TSM n=4", "vanilla, S"):
        assert row in table
    assert "[875,1000)" in table
    for name in ("tsm4.safetensors", "vanilla.safetensors", "vanilla_per_expert.safetensors", "samples_before_after.png"):
        assert os.path.isfile(tmp_path / name)
