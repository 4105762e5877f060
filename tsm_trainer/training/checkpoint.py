"""Training state for exact resume, without pickle: tensors in safetensors, the rest in JSON.

A state folder ``{output_name}-state-{step}`` holds ``network.safetensors`` (the native file),
``optimizer.safetensors`` + ``state.json`` (optimizer class and scalars, scheduler, step, data
position, the run record of :mod:`.run_record`, the global RNG state). Folders are written under a
temp name ``.tmp-{output_name}-state-{step}-*`` and renamed, so a crash never leaves a half-written
state behind. The older layout ``state-{step}`` (no output name) is still read by ``--resume``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch

from tsm_trainer.core.atomic_write import atomic_folder
from tsm_trainer.core.file_format import load_file, save_file_atomic
from tsm_trainer.training.run_record import compare_runs

_LEGACY = re.compile(r"state-(\d+)")


def state_folder(output_dir: str, output_name: str, step: int) -> str:
    return os.path.join(output_dir, f"{output_name}-state-{step}")


def list_states(output_dir: str, output_name: str) -> list[str]:
    """This output name's state folders in ``output_dir``, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    own = re.compile(re.escape(output_name) + r"-state-(\d+)")
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := own.fullmatch(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_state(output_dir: str, output_name: str) -> str:
    """The newest state of this output name; without one, the newest old-layout ``state-N``
    folder (saved before states carried the name); "" when there is neither."""
    own = list_states(output_dir, output_name)
    if own:
        return own[-1]
    if not os.path.isdir(output_dir):
        return ""
    legacy = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _LEGACY.fullmatch(name))]
    return os.path.join(output_dir, max(legacy)[1]) if legacy else ""


def kept_checkpoint_note(output_dir: str, output_name: str) -> str:
    """What a failed run leaves: the newest state, else the newest network save (kohya's
    ``NAME-stepNNNNNNNN`` / ``NAME-NNNNNN`` files, written without ``--save_state``), or that there is none yet."""
    latest = latest_state(output_dir, output_name)
    if not latest and os.path.isdir(output_dir):
        saves = re.compile(re.escape(output_name) + r"-(step)?\d+\.safetensors")
        found = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if saves.fullmatch(n)]
        latest = max(found, key=os.path.getmtime) if found else ""
    return f"the last good checkpoint {latest} is kept" if latest else "no checkpoint of this run was saved yet"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"class": type(optimizer).__name__, "param_groups": state["param_groups"], "scalars": scalars}


def save_state(folder: str, network, optimizer, lr_scheduler, extra: dict) -> None:
    """Write a resumable state to ``folder`` atomically (temp folder + rename)."""
    with atomic_folder(folder) as tmp:
        network.save(os.path.join(tmp, "network.safetensors"))
        tensors, rest = _optimizer_tensors(optimizer)
        save_file_atomic(
            {**tensors, "rng.torch_cpu": torch.get_rng_state()},
            os.path.join(tmp, "optimizer.safetensors"),
            add_hashes=False,
        )
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"optimizer": rest, "lr_scheduler": lr_scheduler.state_dict(), **extra}, f)


def read_state_json(folder: str) -> dict:
    """``state.json`` of a state folder, checked: ValueError naming the file and what is wrong."""
    path = os.path.join(folder, "state.json")
    damaged = "resume from another state folder, or start without --resume"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the state is damaged: {damaged}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: should hold a JSON object, not {type(state).__name__}; {damaged}")
    for key in ("step", "epoch", "position"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: key '{key}' should be an integer >= 0, got {value!r}; {damaged}")
    opt = state.get("optimizer")
    if not (
        isinstance(opt, dict)
        and isinstance(opt.get("param_groups"), list)
        and opt["param_groups"]
        and all(isinstance(g, dict) for g in opt["param_groups"])
        and isinstance(opt.get("scalars"), dict)
    ):
        raise ValueError(
            f"{path}: key 'optimizer' should hold 'param_groups' (a list of objects) and 'scalars' "
            f"(an object); {damaged}"
        )
    if not isinstance(state.get("lr_scheduler"), dict):
        raise ValueError(f"{path}: key 'lr_scheduler' should be an object; {damaged}")
    return state


def _check_optimizer(path: str, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """The saved optimizer state must be of this optimizer (another one fails with a bare KeyError)."""
    current = type(optimizer).__name__
    saved_class = saved.get("class")
    saved_keys = set(saved["param_groups"][0]) - {"params"}
    current_keys = set(optimizer.param_groups[0]) - {"params"}
    if (saved_class is not None and saved_class != current) or (saved_class is None and saved_keys != current_keys):
        name = saved_class or f"one with the settings {sorted(saved_keys)}"
        raise ValueError(
            f"{path}: the state was saved with the optimizer {name}, this run uses {current}; resume "
            "with the optimizer the state was saved with, or start without --resume"
        )
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"{path}: the state has {len(saved['param_groups'])} parameter group(s), this run "
            f"{len(optimizer.param_groups)} (a text-encoder LoRA was added or removed); resume with "
            "the same network options"
        )


def _apply_current_hyperparameters(optimizer, lr_scheduler, base_lrs: list[float], weight_decays: list) -> None:
    """After loading, the learning rates and weight decay of this run's options apply again (the
    loaded param_groups and scheduler carry the old ones); the schedule's step is kept."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = base_lrs[i]
        if weight_decays[i] is not None:
            group["weight_decay"] = weight_decays[i]
        if lambdas is not None:
            group["lr"] = base_lrs[i] * lambdas[i](lr_scheduler.last_epoch)
    if lambdas is not None:
        lr_scheduler.base_lrs = list(base_lrs)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_state(
    folder: str, network, optimizer, lr_scheduler, run: dict | None = None, log: Callable[[str], None] = print
) -> dict:
    """Restore what :func:`save_state` wrote; returns the ``extra`` dict (step, data position...).

    ``run`` is this run's :func:`.run_record.run_record`: an option that must not change stops
    with a ValueError naming it; options that may change take effect and are logged. Nothing is
    loaded before every check passed."""
    for name in ("network.safetensors", "optimizer.safetensors", "state.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"--resume {folder}: {name} is missing (not a training-state folder)")
    state = read_state_json(folder)
    path = os.path.join(folder, "state.json")
    _check_optimizer(path, state["optimizer"], optimizer)
    if run is not None:
        for line in compare_runs(path, state.get("run"), run):
            log(line)
    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    weight_decays = [g.get("weight_decay") for g in optimizer.param_groups]
    network.load_weights(os.path.join(folder, "network.safetensors"))
    tensors, _ = load_file(os.path.join(folder, "optimizer.safetensors"))
    if "rng.torch_cpu" not in tensors:
        raise ValueError(f"{folder}/optimizer.safetensors: tensor 'rng.torch_cpu' is missing; the state is damaged")
    opt = state.pop("optimizer")
    per_param: dict[int, dict] = {}
    try:
        for key, value in [*tensors.items(), *opt["scalars"].items()]:
            if not key.startswith("rng."):
                pid, name = key.split(".", 1)
                per_param.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": opt["param_groups"]})
        lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise ValueError(
            f"{folder}: the optimizer or scheduler state does not fit this run ({type(e).__name__}: "
            f"{e}); the state is damaged or from another network"
        ) from None
    _apply_current_hyperparameters(optimizer, lr_scheduler, base_lrs, weight_decays)
    torch.set_rng_state(tensors["rng.torch_cpu"])  # dropout draws from the global generator
    return state
