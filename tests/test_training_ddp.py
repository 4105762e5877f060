"""Two CPU processes (torch.distributed, gloo): gradients are averaged across processes, and an
expert no process used in a step keeps grad None and stays untouched everywhere."""

import json
import os
import subprocess
import sys

import torch

from tests.tiny_models import tiny_sd_pipeline_folder
from tsm_trainer.core.file_format import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_training(tmp_path):
    base = tiny_sd_pipeline_folder(str(tmp_path / "base"))
    out = str(tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        os.path.join(ROOT, "tests", "ddp_worker.py"),
        base,
        out,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(os.path.join(out, f"rank{r}.safetensors"))[0] for r in (0, 1)]
    used = [set(json.load(open(os.path.join(out, f"rank{r}.json")))) for r in (0, 1)]
    everywhere = used[0] | used[1]
    assert len(everywhere) < 8  # 2 steps x 1 sample x 2 processes: some experts got no sample
    finals = {k[len("final.") :] for k in ranks[0] if k.startswith("final.")}
    for key in finals:
        a, b = ranks[0][f"final.{key}"], ranks[1][f"final.{key}"]
        assert torch.equal(a, b), key  # identical weights on both processes after sync
        if ".tsm.8." in key:
            expert = int(key.split(".tsm.8.")[1].split(".")[0])
            changed = not torch.equal(a, ranks[0][f"init.{key}"])
            if expert not in everywhere:
                assert not changed, key  # untouched: no sample anywhere
            elif key.endswith("lora_down.weight") and expert in used[0] ^ used[1]:
                assert changed, key  # trained on one process only, updated on both
