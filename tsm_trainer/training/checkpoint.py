"""Training state for exact resume, without pickle: tensors in safetensors, the rest in JSON.

A state folder ``state-{step}`` holds ``network.safetensors`` (the native file),
``optimizer.safetensors`` + ``state.json`` (optimizer scalars, scheduler, step, data position,
the global RNG state). Folders are written under a temp name and renamed, so a crash never leaves a
half-written state behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..file_format import load_file, save_file_atomic


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_state(folder: str, network, optimizer, lr_scheduler, extra: dict) -> None:
    """Write a resumable state to ``folder`` atomically (temp folder + rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-state-", dir=parent)
    try:
        network.save(os.path.join(tmp, "network.safetensors"))
        tensors, rest = _optimizer_tensors(optimizer)
        save_file_atomic({**tensors, "rng.torch_cpu": torch.get_rng_state()},
                         os.path.join(tmp, "optimizer.safetensors"), add_hashes=False)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"optimizer": rest, "lr_scheduler": lr_scheduler.state_dict(), **extra}, f)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(folder: str, network, optimizer, lr_scheduler) -> dict:
    """Restore what :func:`save_state` wrote; returns the ``extra`` dict (step, data position...)."""
    for name in ("network.safetensors", "optimizer.safetensors", "state.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"--resume {folder}: {name} is missing (not a training-state folder)")
    network.load_weights(os.path.join(folder, "network.safetensors"))
    tensors, _ = load_file(os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    opt = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("rng."):
            pid, name = key.split(".", 1)
            per_param.setdefault(int(pid), {})[name] = value
    for key, value in opt["scalars"].items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": opt["param_groups"]})
    lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
    torch.set_rng_state(tensors["rng.torch_cpu"])  # dropout draws from the global generator
    return state


def prune_states(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` ``state-*`` folders."""
    states = sorted((d for d in os.listdir(output_dir) if d.startswith("state-") and d[6:].isdigit()),
                    key=lambda d: int(d[6:]))
    for old in states[: max(0, len(states) - keep)]:
        shutil.rmtree(os.path.join(output_dir, old), ignore_errors=True)
