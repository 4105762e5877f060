"""The ComfyUI node and the exported workflow inside REAL ComfyUI code (comfyanonymous/ComfyUI, pinned a125cd84).

Skipped unless ``TSM_COMFYUI_DIR`` points at a checkout of that commit. A tiny random-init SD1.5 model
of ComfyUI's own classes (``comfy.supported_models.SD15`` -> ``BaseModel`` + ``UNetModel``,
``comfy.model_patcher.ModelPatcher``), the node loaded by ComfyUI's own ``nodes.load_custom_node``,
sampled by ``nodes.common_ksampler`` (``comfy.sample`` / ``comfy.samplers``), compared with ComfyUI's
``comfy.sd.load_lora_for_models`` (LoraLoader) on the exported expert; the workflow's keyframes run
through ComfyUI's ``comfy_extras.nodes_hooks`` nodes and ``comfy.hooks``. No ComfyUI stub; torchvision is
import-stubbed (tests/fakes/torchvision_stub.py). Run with the venv described in extensions/comfyui-tsm/README.md:

    TSM_COMFYUI_DIR=/work/real/comfyui /work/venvs/comfy/bin/python -m pytest tests/test_ext_comfyui_real.py -q

Run the Forge and ComfyUI real-code files in separate pytest processes: each puts its tool's
top-level packages on sys.path, and the two were not tried in one process.
"""

import asyncio
import os
import sys

import pytest
import torch

COMFY = os.environ.get("TSM_COMFYUI_DIR")
pytestmark = [
    pytest.mark.skipif(not COMFY, reason="TSM_COMFYUI_DIR does not point at a ComfyUI checkout"),
    pytest.mark.usefixtures("one_torch_thread"),
]  # tiny models: see tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if COMFY:
    import transformers  # noqa: F401 - before the stub: its torchvision check must say "absent"

    from tests.fakes import torchvision_stub

    torchvision_stub.install()
    sys.path.append(COMFY)  # appended: this repo's `tests` package keeps precedence over ComfyUI's
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # no CUDA here
    import comfy.hooks
    import comfy.model_patcher
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import comfy_extras.nodes_hooks as nodes_hooks
    import nodes

from tsm_trainer.core.intervals import expert_index, interval_timestep_range  # noqa: E402
from tsm_trainer.files.comfyui_workflow import build_workflow  # noqa: E402
from tsm_trainer.files.export import expert_lora  # noqa: E402
from tsm_trainer.runtime.sampling_session import TSMSamplingError  # noqa: E402

CPU = torch.device("cpu")
UNET_CONFIG = {
    "context_dim": 16,
    "model_channels": 32,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "in_channels": 4,
    "out_channels": 4,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "image_size": 32,
    "use_checkpoint": False,
    "use_temporal_resblock": False,
}


def _model():
    """ComfyUI's SD1.5 model classes at a tiny size; ComfyUI builds them uninitialised, so: random weights."""
    base = comfy.supported_models.SD15(dict(UNET_CONFIG)).get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return comfy.model_patcher.ModelPatcher(base, CPU, CPU)


@pytest.fixture(scope="module")
def tsm_file(tmp_path_factory):
    """A fostered 8-expert file on every attention projection of the tiny model (kohya SGM names)."""
    from safetensors.torch import save_file

    from tests.tiny_models import tiny_unet
    from tsm_trainer import TSMConfig, TSMNetwork
    from tsm_trainer.core.file_format import load_file

    folder = tmp_path_factory.mktemp("loras")
    meta_path = str(folder / "meta.safetensors")
    TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=2.0), tiny_unet()).save(meta_path)
    metadata = load_file(meta_path)[1]
    os.unlink(meta_path)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for path, m in _model().model.diffusion_model.named_modules():
        if path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            name = "lora_unet_" + path.replace(".", "_")
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
            for e in range(8):
                tensors[f"{name}.tsm.8.{e}.lora_down.weight"] = torch.randn(2, m.weight.shape[1], generator=g) * 0.3
                tensors[f"{name}.tsm.8.{e}.lora_up.weight"] = torch.randn(m.weight.shape[0], 2, generator=g) * 0.3
    save_file(tensors, str(folder / "tsm8.safetensors"), metadata)
    return folder, tensors


@pytest.fixture(scope="module")
def node(tsm_file):
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(tsm_file[0]), is_default=True)
    assert asyncio.run(nodes.load_custom_node(os.path.join(REPO, "extensions", "comfyui-tsm")))
    return nodes.NODE_CLASS_MAPPINGS["LoadTSMLoRA"]()


def _cond(seed):
    return [[torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(seed)), {}]]


def _ksample(model, steps, scheduler="normal", denoise=1.0):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, 7, steps, 5.0, "euler", scheduler, _cond(1), _cond(2), latent, denoise=denoise)[
        0
    ]["samples"]


def _snapshot(model):
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(model.model.state_dict()[k], v) for k, v in snap.items())


def _record(model, session_of):
    """(UNet t, merged expert) per UNet call, until the returned handle is removed."""
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda m, args: seen.append((int(args[1][0]), session_of().runs[0].active))
    )
    return seen, handle


def test_node_equals_comfys_lora_loader_on_the_exported_expert_and_restores(node, tsm_file):
    """Low denoise: every call of the run has t in [0, 125), expert 0 of 8."""
    model = _model()
    before = _snapshot(model)
    patched, _ = node.load_tsm_lora(model, None, "tsm8.safetensors", 0.8, 0.0)
    state = patched.get_wrappers("apply_model", "tsm_trainer.load_tsm_lora")[0].__self__
    seen, handle = _record(model, lambda: state.session)
    ours = _ksample(patched, 3, denoise=0.05)
    handle.remove()
    assert seen and all(t < 125 and e == 0 for t, e in seen)
    assert _same(model, before)  # ON_CLEANUP restored every weight bit for bit

    lora_model, _ = comfy.sd.load_lora_for_models(model, None, expert_lora(tsm_file[1], 8, 0), 0.8, 0.0)
    theirs = _ksample(lora_model, 3, denoise=0.05)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, _ksample(model, 3, denoise=0.05), atol=1e-4)
    assert _same(model, before)


@pytest.mark.parametrize("scheduler,steps", [("normal", 9), ("sgm_uniform", 8)])
def test_full_run_uses_the_expert_of_the_unets_t_at_every_call(node, scheduler, steps):
    model = _model()
    before = _snapshot(model)
    patched, _ = node.load_tsm_lora(model, None, "tsm8.safetensors", 1.0, 0.0)
    state = patched.get_wrappers("apply_model", "tsm_trainer.load_tsm_lora")[0].__self__
    seen, handle = _record(model, lambda: state.session)
    _ksample(patched, steps, scheduler)
    handle.remove()
    assert len(seen) == steps and 500 in [t for t, _ in seen]  # the t = 499.5 sigma reaches the UNet as 500
    assert all(e == expert_index(t, 8) for t, e in seen)
    assert state.session is None and _same(model, before)


def _keyframe_groups(workflow):
    """Each expert's HookKeyframeGroup, built by ComfyUI's own keyframe nodes from the workflow's widgets."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    link_src = {link[0]: link[1] for link in workflow["links"]}
    groups = {}
    for n in workflow["nodes"]:
        if n["type"] != "SetHookKeyframes":
            continue
        chain, node_id = [], link_src[n["inputs"][1]["link"]]
        while node_id is not None:
            chain.append(by_id[node_id])
            prev = by_id[node_id]["inputs"][0]["link"]
            node_id = link_src[prev] if prev is not None else None
        kf = None
        for kn in reversed(chain):
            w = kn["widgets_values"]
            if kn["type"] == "CreateHookKeyframesInterpolated":
                (kf,) = nodes_hooks.CreateHookKeyframesInterpolated().create_hook_keyframes(*w, prev_hook_kf=kf)
            else:
                (kf,) = nodes_hooks.CreateHookKeyframe().create_hook_keyframe(*w, prev_hook_kf=kf)
        lora = by_id[link_src[n["inputs"][0]["link"]]]["widgets_values"][0]
        groups[lora] = kf
    return groups


@pytest.mark.parametrize(
    "scheduler,steps",
    [
        ("normal", 9),
        ("normal", 25),
        ("sgm_uniform", 8),
        ("normal", 3),
        ("karras", 30),
        ("simple", 20),
        ("sgm_uniform", 20),
        ("normal", 10),
    ],
)
@pytest.mark.parametrize("n", [8, 4, 6])
def test_exported_workflow_applies_the_nodes_expert_at_every_sigma(scheduler, steps, n):
    """ComfyUI's real percent_to_sigma, scheduler and hook keyframe stepping (HookKeyframeGroup.
    prepare_current_keyframe, as comfy/samplers.py calls it per model call) against the node's rule,
    expert_index(model_sampling.timestep(sigma)). Before the fix, t = 499.5 got expert 3 of 8."""
    base = _model().model
    experts = [(f"e{e}.safetensors",) + interval_timestep_range(e, n) for e in range(n)]
    wf = build_workflow(experts, "sd15.safetensors", None, "p", "n", steps, 5.0, 1, 64, 64)
    groups = _keyframe_groups(wf)
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, scheduler, steps)
    for g in groups.values():
        g.initialize_timesteps(base)
        g.reset()
    options = {"sample_sigmas": sigmas}
    for sigma in sigmas[:-1]:
        t = int(base.model_sampling.timestep(sigma.reshape(1)))
        for g in groups.values():
            g.prepare_current_keyframe(float(sigma), options)
        on = [name for name, g in groups.items() if g.strength != 0.0]
        assert on == [f"e{expert_index(t, n)}.safetensors"], f"sigma={float(sigma)} t={t}"


def test_a_file_error_mid_sampling_restores_and_stops_the_prompt(node, tsm_file, tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v for k, v in tsm_file[1].items() if ".tsm.8.7." not in k}  # no expert for t >= 875
    from tsm_trainer.core.file_format import load_file

    save_file(tensors, str(tsm_file[0] / "no7.safetensors"), load_file(str(tsm_file[0] / "tsm8.safetensors"))[1])
    model = _model()
    before = _snapshot(model)
    patched, _ = nodes.NODE_CLASS_MAPPINGS["LoadTSMLoRA"]().load_tsm_lora(model, None, "no7.safetensors", 1.0, 0.0)
    with pytest.raises(TSMSamplingError, match="needs expert 7 of scale 8.*the base weights were restored"):
        _ksample(patched, 4)
    assert _same(model, before)


def test_lowvram_load_with_a_plain_lora_matches_the_full_load(node, tsm_file):
    """ModelPatcher.load(lowvram_model_memory=...) leaves layers to be cast per forward with the plain LoRA
    applied by a weight_function (lowvram patches); the TSM merge writes the stored weight underneath."""
    plain = expert_lora(tsm_file[1], 8, 3)  # any plain LoRA
    outs = []
    for lowvram in (False, True):
        model = _model()
        before = _snapshot(model)
        with_plain, _ = comfy.sd.load_lora_for_models(model, None, plain, 0.5, 0.0)
        patched, _ = node.load_tsm_lora(with_plain, None, "tsm8.safetensors", 1.0, 0.0)
        if lowvram:
            patched.load(CPU, lowvram_model_memory=1, force_patch_weights=False, full_load=False)
            assert any(getattr(m, "comfy_cast_weights", False) for m in model.model.diffusion_model.modules())
            assert patched.model.lowvram_patch_counter > 0
        outs.append(_ksample(patched, 4))
        patched.unpatch_model(CPU)
        assert _same(model, before)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_comfy_unpatching_mid_run_does_not_get_undone_by_our_restore(node, tsm_file):
    """ModelPatcher.partially_unload during sampling (memory pressure) puts ComfyUI's backups back under the
    merged expert and forgets them. Restoring our (plain-LoRA-patched) backup afterwards left base + LoRA in
    weights ComfyUI believes unpatched: every later run got the plain LoRA twice."""
    import comfy.model_management as mm

    model = _model()
    before = _snapshot(model)
    with_plain, _ = comfy.sd.load_lora_for_models(model, None, expert_lora(tsm_file[1], 8, 3), 0.5, 0.0)
    patched, _ = node.load_tsm_lora(with_plain, None, "tsm8.safetensors", 1.0, 0.0)
    calls = []

    def unload_on_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            (loaded,) = [lm.model for lm in mm.current_loaded_models if lm.model.model is model.model]
            assert loaded.partially_unload(CPU, memory_to_free=10**12) > 0

    handle = model.model.diffusion_model.register_forward_pre_hook(unload_on_second_call)
    _ksample(patched, 4)
    handle.remove()
    mm.unload_all_models()  # ComfyUI unpatches whatever it still holds patched
    assert _same(model, before)
