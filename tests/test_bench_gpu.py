"""bench/gpu.py: the --quick CPU run end to end, the full-size model configs, and the target checks."""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "bench", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_every_configuration_on_the_same_step(gpu, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    settings = {(r["model"], r["checkpointing"]) for r in rows}
    assert settings == {(m, c) for m in ("sd15-tiny", "sdxl-tiny") for c in (False, True)}
    assert [r["config"] for r in rows] == ["vanilla", "tsm8", "stage2", "peft"] * 4
    for r in rows:
        assert r["step_s"] > 0 and r["trainable"] > 0 and "error" not in r
    for setting in settings:
        by = {r["config"]: r for r in rows if (r["model"], r["checkpointing"]) == setting}
        assert by["vanilla"]["time_ratio"] == 1.0
        # LoRA up factors start at zero: vanilla, TSM and the peft loop compute the base model's loss...
        assert by["tsm8"]["first_loss"] == pytest.approx(by["vanilla"]["first_loss"], rel=1e-5)
        assert by["peft"]["first_loss"] == pytest.approx(by["vanilla"]["first_loss"], rel=1e-5)
        # ...and stage 2 mixes nonzero experts; TSM trains 8x vanilla's parameters
        assert by["stage2"]["first_loss"] != by["vanilla"]["first_loss"]
        assert by["tsm8"]["trainable"] == 8 * by["vanilla"]["trainable"] == 8 * by["peft"]["trainable"]
    printed = capsys.readouterr().out
    assert "| sdxl-tiny | 2 | bf16 | adamw | on | sdpa | half |" in printed
    assert printed.count("| not measured |") == 5  # the targets are about CUDA rows only


def test_full_size_configs_are_the_released_models(gpu):
    sizes = {}
    for name in ("sd15", "sdxl"):
        unet, encoders = gpu.build_models(name, torch.device("meta"))
        sizes[name] = [sum(p.numel() for p in m.parameters()) for m in (unet, *encoders)]
    # parameter counts of the released SD1.5 / SDXL UNets, CLIP-L and OpenCLIP bigG text encoders
    assert sizes == {"sd15": [859_520_964, 123_060_480], "sdxl": [2_567_463_684, 123_060_480, 694_659_840]}


def test_full_size_needs_cuda(gpu, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SystemExit):
        gpu.main(["--models", "sd15"])
    assert "need a CUDA GPU (--device cuda); on CPU use --quick" in capsys.readouterr().err


def _row(gpu, config, model="sd15", step_s=1.0, alloc=4.0, reserved=5.0, **setting):
    base = dict(
        model=model,
        batch=1,
        precision="fp16",
        optimizer="adamw8bit",
        checkpointing=True,
        attention="sdpa",
        base_dtype="half",
        device="cuda:0",
    )
    return dict(base, **setting, config=config, step_s=step_s, peak_alloc_gib=alloc, peak_reserved_gib=reserved)


def test_targets_take_the_worst_setting_and_count_out_of_memory_as_not_fitting(gpu):
    rows = [
        _row(gpu, "vanilla"),
        _row(gpu, "tsm8", step_s=1.04, alloc=4.2),
        _row(gpu, "stage2", step_s=1.3),
        _row(gpu, "peft", step_s=0.9),
        _row(gpu, "vanilla", batch=4),
        _row(gpu, "tsm8", batch=4, step_s=1.02, alloc=4.8),
        _row(gpu, "vanilla", model="sdxl", reserved=11.0),
        _row(gpu, "tsm8", model="sdxl", reserved=11.5),
    ]
    oom = _row(gpu, "stage2", model="sdxl")
    del oom["step_s"], oom["peak_alloc_gib"], oom["peak_reserved_gib"]
    gpu.add_ratios(rows + [dict(oom, error="out of memory")])
    status = {t["target"]: (t["status"], t["worst"]) for t in gpu.check_targets(rows)}
    assert status == {
        gpu.TARGETS[0][0]: ("pass", pytest.approx(1.04)),
        gpu.TARGETS[1][0]: ("FAIL", pytest.approx(1.2)),  # batch 4: 4.8 / 4.0
        gpu.TARGETS[2][0]: ("FAIL", pytest.approx(1.3)),
        gpu.TARGETS[3][0]: ("pass", 5.0),
        gpu.TARGETS[4][0]: ("pass", 11.5),
    }
    status = {t["target"]: t["status"] for t in gpu.check_targets(rows + [dict(oom, error="out of memory")])}
    assert status[gpu.TARGETS[4][0]] == "FAIL"
