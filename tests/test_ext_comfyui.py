"""The ComfyUI node `Load TSM LoRA` (extensions/comfyui-tsm) against the stand-ins of tests/fakes/comfyui.py
(no ComfyUI is installed here). The model's ``diffusion_model`` is a tiny diffusers UNet (its kohya names
are the file's names). tests/test_ext_comfyui_real.py loads the node into ComfyUI's real modules."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

import pytest
import torch

from tests.fakes.comfyui import (
    CLIP,
    BaseModel,
    ModelPatcher,
    SD1ClipModel,
    WrappersMP,
    calculate_sigmas,
    comfy_modules,
    copy_nested_dicts,
    outer_sample,
)
from tests.tiny_models import randomise as _randomise
from tests.tiny_models import tiny_clip, tiny_unet, write_assembled_file
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.core.file_format import TSMFileError
from tsm_trainer.core.intervals import expert_index

EXT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "extensions", "comfyui-tsm")


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    # Stage 1: 8 experts + the shared text-encoder LoRA.
    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0, conv_rank=2), tiny_unet(), [tiny_clip()])
    _randomise(net)
    net.save(str(folder / "f8.safetensors"))
    write_assembled_file(folder, "a81.safetensors")  # stage 2: [8, 1], routers non-zero
    return folder


@pytest.fixture
def comfy(lora_dir, monkeypatch, tmp_path):
    """The stand-ins in sys.modules, then the extension loaded as ComfyUI loads a custom node
    (spec_from_file_location on <folder>/__init__.py), through a symlinked folder."""
    for name, module in comfy_modules(lora_dir).items():
        monkeypatch.setitem(sys.modules, name, module)

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    link = custom_nodes / "comfyui-tsm"
    os.symlink(EXT_DIR, link)
    module_name = str(link).replace(".", "_x_")  # as nodes.py load_custom_node names a folder's module
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(link, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    yield types.SimpleNamespace(module=module, nodes=sys.modules[module_name + ".nodes"], lora_dir=lora_dir)
    sys.modules.pop(module_name + ".nodes", None)


def _model_and_clip(seed=0):
    base = BaseModel(tiny_unet(seed=seed))
    model = ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    clip = CLIP(SD1ClipModel(tiny_clip(seed=seed)))
    return model, clip


def _inputs(batch=1):
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randn(batch, 5, 16, generator=g),
        torch.randn(batch, 5, 16, generator=g),
    )


def _state(patched, nodes):
    (wrapper,) = patched.get_wrappers(WrappersMP.APPLY_MODEL, nodes.WRAPPER_KEY)
    return wrapper.__self__


@functools.cache
def _reference_outputs(path, sigmas):
    """Training-time TSM (TSMNetwork.from_file) on a fresh model: the UNet output per sigma."""
    base = BaseModel(tiny_unet())
    net = TSMNetwork.from_file(path, base.diffusion_model, [tiny_clip()])
    net.apply()
    net.attach(base.diffusion_model)
    return {s: _unet_output(base, s) for s in sigmas}


def _unet_output(base, sigma, patcher=None, batch=2):
    """One apply_model call at sigma (a sampling run of one call when patcher is given)."""
    x, c, _ = _inputs(batch)
    seen = []
    handle = base.diffusion_model.register_forward_hook(lambda m, a, out: seen.append(out.sample.clone()))
    sig = torch.as_tensor(sigma, dtype=torch.float32).expand(batch).clone()
    to = {"wrappers": copy_nested_dicts(patcher.wrappers)} if patcher is not None else {}
    try:
        with torch.no_grad():
            base.apply_model(x, sig, c_crossattn=c, transformer_options=to)
    finally:
        handle.remove()
        if patcher is not None:
            patcher.cleanup()
    return seen[0]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def test_node_registration_and_interface(comfy):
    m = comfy.module
    assert m.NODE_CLASS_MAPPINGS == {"LoadTSMLoRA": comfy.nodes.LoadTSMLoRA}
    assert m.NODE_DISPLAY_NAME_MAPPINGS == {"LoadTSMLoRA": "Load TSM LoRA"}
    cls = m.NODE_CLASS_MAPPINGS["LoadTSMLoRA"]
    required = cls.INPUT_TYPES()["required"]
    assert list(required) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert required["model"][0] == "MODEL" and required["clip"][0] == "CLIP"
    assert required["lora_name"][0] == sorted(os.listdir(comfy.lora_dir))
    for key in ("strength_model", "strength_clip"):
        assert required[key][0] == "FLOAT" and required[key][1]["default"] == 1.0
    assert cls.RETURN_TYPES == ("MODEL", "CLIP")
    assert cls.FUNCTION == "load_tsm_lora" and hasattr(cls, cls.FUNCTION)
    assert isinstance(cls.CATEGORY, str)


@pytest.mark.parametrize("scheduler", ["karras", "simple"])
@pytest.mark.parametrize("steps", [4, 8, 30])
def test_expert_follows_model_sampling_timestep_and_weights_come_back(comfy, scheduler, steps):
    model, clip = _model_and_clip()
    base = model.model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    patched, _ = comfy.nodes.LoadTSMLoRA().load_tsm_lora(model, clip, "f8.safetensors", 0.8, 1.0)
    assert patched is not model and patched.model is base
    state = _state(patched, comfy.nodes)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())  # nothing applied before sampling

    calls = []

    def record(module, args):
        (run,) = state.session
        assert run.merge
        calls.append((run.active, run.merges))

    sigmas = calculate_sigmas(base.model_sampling, scheduler, steps)
    handle = base.diffusion_model.register_forward_pre_hook(record)
    try:
        noise, cond, uncond = _inputs()
        outer_sample(patched, noise, sigmas, cond, uncond)
    finally:
        handle.remove()

    assert len(calls) == steps
    expected = [expert_index(int(base.model_sampling.timestep(s.reshape(1))), 8) for s in sigmas[:-1]]
    assert [e for e, _ in calls] == expected
    crossings = sum(1 for a, b in zip(expected, expected[1:]) if a != b)
    assert calls[-1][1] == crossings + 1 <= 8  # the first merge plus one per boundary crossed
    assert state.session is None  # ON_CLEANUP ran
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_stage1_output_equals_training_time_network(comfy):
    path = str(comfy.lora_dir / "f8.safetensors")
    sigmas = (14.0, 2.0, 0.5, 0.05)
    reference = _reference_outputs(path, sigmas)
    model, clip = _model_and_clip()
    patched, _ = comfy.nodes.LoadTSMLoRA().load_tsm_lora(model, clip, "f8.safetensors", 1.0, 1.0)
    for s in sigmas:
        torch.testing.assert_close(_unet_output(patched.model, s, patched), reference[s], rtol=1e-4, atol=1e-5)
    # Per-sample sigmas in different experts: the online path for that run, same numbers.
    base = patched.model
    x, c, _ = _inputs(2)
    sig = torch.tensor([14.0, 0.05])
    seen = []
    handle = base.diffusion_model.register_forward_hook(lambda m, a, out: seen.append(out.sample.clone()))
    try:
        with torch.no_grad():
            base.apply_model(
                x, sig, c_crossattn=c, transformer_options={"wrappers": copy_nested_dicts(patched.wrappers)}
            )
        assert not _state(patched, comfy.nodes).session.runs[0].merge  # went online for that run
    finally:
        handle.remove()
        patched.cleanup()
    torch.testing.assert_close(seen[0][0], reference[14.0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen[0][1], reference[0.05][1], rtol=1e-4, atol=1e-5)


def test_stage1_merges_on_top_of_plain_lora_weight_patches(comfy):
    """A plain LoRA patched by ComfyUI (ModelPatcher.add_patches, applied at load) stays under the expert."""
    from safetensors.torch import load_file as st_load

    tensors = st_load(str(comfy.lora_dir / "f8.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    key = "diffusion_model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    model, clip = _model_and_clip()
    base = model.model
    layer = base.get_submodule(key[: -len(".weight")])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plain = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(5))
    with_plain = model.clone()
    with_plain.add_patches({key: ("lora", (plain, torch.eye(plain.shape[1]), float(plain.shape[1]), None))}, 0.5)
    patched, _ = comfy.nodes.LoadTSMLoRA().load_tsm_lora(with_plain, clip, "f8.safetensors", 0.8, 0.0)
    seen = []

    def record(module, args):
        e = _state(patched, comfy.nodes).session.runs[0].active
        down, up = tensors[f"{name}.tsm.8.{e}.lora_down.weight"], tensors[f"{name}.tsm.8.{e}.lora_up.weight"]
        expert = 0.8 * float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        seen.append((layer.weight.detach() - before[key] - 0.5 * plain - expert).abs().max().item())

    handle = base.diffusion_model.register_forward_pre_hook(record)
    try:
        noise, cond, uncond = _inputs()
        outer_sample(patched, noise, calculate_sigmas(base.model_sampling, "karras", 6), cond, uncond)
    finally:
        handle.remove()
    assert len(seen) == 6 and max(seen) < 1e-5
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


def test_stage2_router_file_equals_tsmnetwork(comfy):
    path = str(comfy.lora_dir / "a81.safetensors")
    sigmas = (14.0, 1.0, 0.03)
    reference = _reference_outputs(path, sigmas)
    model, clip = _model_and_clip()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched, clip_out = comfy.nodes.LoadTSMLoRA().load_tsm_lora(model, clip, "a81.safetensors", 1.0, 1.0)
    assert clip_out is clip  # no text-encoder LoRA in this file
    for s in sigmas:
        out = _unet_output(patched.model, s, patched)
        torch.testing.assert_close(out, reference[s], rtol=1e-4, atol=1e-5)
    state = _state(patched, comfy.nodes)
    assert state.session is None
    assert not any("forward" in vars(m) for m in model.model.diffusion_model.modules())  # wrappers removed
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in before.items())
    # A full sampling run with the router file also leaves the base model as it was.
    noise, cond, uncond = _inputs()
    outer_sample(patched, noise, calculate_sigmas(model.model.model_sampling, "karras", 8), cond, uncond)
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in before.items())


def test_text_encoder_lora_goes_through_comfy_lora_patches(comfy):
    path = str(comfy.lora_dir / "f8.safetensors")
    model, clip = _model_and_clip()
    _, new_clip = comfy.nodes.LoadTSMLoRA().load_tsm_lora(model, clip, "f8.safetensors", 1.0, 0.7)
    assert new_clip is not clip and new_clip.cond_stage_model is clip.cond_stage_model and not clip.patcher.patches
    keys = set(new_clip.patcher.patches)
    assert keys and all(k.startswith("clip_l.transformer.text_model.encoder.layers.") for k in keys)
    assert all(p[0][0] == 0.7 for p in new_clip.patcher.patches.values())
    # Patched the way ComfyUI patches weights, the encoder equals the file's TE LoRA at strength 0.7.
    ref_te = tiny_clip()
    net = TSMNetwork.from_file(path, tiny_unet(), [ref_te], multiplier=0.7)
    net.apply()
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    new_clip.patcher.patch_model()
    try:
        with torch.no_grad():
            out = new_clip.cond_stage_model.clip_l.transformer.text_model(ids).last_hidden_state
            torch.testing.assert_close(out, ref_te(ids).last_hidden_state, rtol=1e-4, atol=1e-5)
    finally:
        new_clip.patcher.unpatch_model()
    # strength_clip 0: the CLIP passes through; strength_model 0: the MODEL does.
    model_out, clip_out = comfy.nodes.LoadTSMLoRA().load_tsm_lora(model, clip, "f8.safetensors", 0.0, 0.0)
    assert model_out is model and clip_out is clip
    model_out, clip_out = comfy.nodes.LoadTSMLoRA().load_tsm_lora(model, clip, "f8.safetensors", 1.0, 0.0)
    assert clip_out is clip and model_out is not model


def test_clear_errors(comfy, tmp_path):
    node = comfy.nodes.LoadTSMLoRA()
    model, clip = _model_and_clip()
    with pytest.raises(FileNotFoundError):
        node.load_tsm_lora(model, clip, "missing.safetensors", 1.0, 1.0)
    patched, _ = node.load_tsm_lora(model, clip, "f8.safetensors", 1.0, 1.0)
    with pytest.raises(ValueError, match="already went through"):
        node.load_tsm_lora(patched, clip, "a81.safetensors", 1.0, 1.0)
    # A model the file doesn't fit: fails at the node, naming the file.
    other = ModelPatcher(
        BaseModel(tiny_unet(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)),
        torch.device("cpu"),
        torch.device("cpu"),
    )
    with pytest.raises(TSMFileError, match="f8.safetensors.*not in this model"):
        node.load_tsm_lora(other, clip, "f8.safetensors", 1.0, 0.0)
