"""The Forge extension (extensions/sd-forge-tsm) against the stand-ins of tests/fakes/forge.py (the
Forge objects it touches, for offline CI). tests/test_ext_forge_real.py runs it against Forge's real modules.
"""

import math
import os
import sys
import warnings

import pytest
import torch
from torch import nn

from tests.fakes.forge import (
    CLIP,
    CLIPHolder,
    DiffusersCall,
    ExtraNetworkParams,
    ForgeLinear,
    ForgeObjects,
    KModel,
    Prediction,
    QuantLinear,
    UnetPatcher,
    denoise,
    dequantized_copy,
    forge_unet,
    karras_sigmas,
    load_lora,
    model_lora_keys_clip,
)
from tests.tiny_models import randomise as _randomise
from tests.tiny_models import tiny_clip, tiny_unet, write_assembled_file
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.core.file_format import TSMFileError, load_file
from tsm_trainer.core.intervals import expert_index
from tsm_trainer.files.export import text_encoder_lora
from tsm_trainer.runtime.sampling_session import TSMSamplingError

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "extensions", "sd-forge-tsm")
)
import tsm_forge
from tsm_forge.adapter import _LinearView


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model, snap):
    return all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


# ------------------------------------------------------------------------------------------------
# files and the sampling loop
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foster_file(tmp_path_factory):
    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0, conv_rank=2), tiny_unet(), [tiny_clip()])
    _randomise(net)
    path = str(tmp_path_factory.mktemp("f") / "f8.safetensors")
    net.save(path)
    return path


@pytest.fixture(scope="module")
def assembled_file(tmp_path_factory):
    return write_assembled_file(tmp_path_factory.mktemp("a"), "a.safetensors")


def _conds():
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)


def sample(unet_patcher, steps, on_call=None):
    """Euler over a Karras schedule with fixed per-step inputs; returns the denoised outputs per call."""
    predictor = unet_patcher.model.predictor
    sigmas = karras_sigmas(steps, float(predictor.sigma_min), float(predictor.sigma_max))
    cond, uncond = _conds()
    g = torch.Generator().manual_seed(11)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            x = torch.randn(1, 4, 8, 8, generator=g) * float(sigmas[i])
            sigma = sigmas[i].reshape(1)
            outs.append(torch.cat(denoise(unet_patcher, x, sigma, cond, uncond)))
            if on_call is not None:
                on_call(sigma)
    return outs


def _record(model, session):
    """Record (t the UNet receives, merged expert) at every UNet call, after the TSM hook ran."""
    seen = []
    model.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1].float(), [r.active for r in session])), with_kwargs=True
    )
    return seen


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_timestep_from_sigma_matches_forge_predictors():
    pred = Prediction()
    sigma = pred.sigmas[[0, 124, 125, 500, 999]]
    assert tsm_forge.timestep_from_sigma(pred, sigma).tolist() == [0, 124, 125, 500, 999]

    class PredictionFlux:  # backend/modules/k_prediction.py: the Flux UNet receives sigma itself
        def timestep(self, sigma):
            return sigma

    assert tsm_forge.timestep_from_sigma(PredictionFlux(), torch.tensor([0.5]), 1000).tolist() == [500.0]


@pytest.mark.parametrize("steps", [4, 8, 30])
def test_merge_path_follows_predictor_timestep_merges_per_crossing_and_restores(foster_file, steps):
    model = KModel(forge_unet())
    base = UnetPatcher(model)
    before = snapshot(model)
    session = tsm_forge.apply_to_unet(base, [tsm_forge.TSMRequest(foster_file)])
    assert "model_function_wrapper" not in base.model_options  # the wrapper slot is left to others
    (run,) = session
    assert run.merge
    seen = _record(model, session)
    sample(base, steps)
    assert len(seen) == steps
    visited = []
    for t, (active,) in seen:
        assert active == expert_index(t, 8)[0].item()
        if not visited or visited[-1] != active:
            visited.append(active)
    assert run.merges == len(visited) <= 8
    assert not same(model, before)  # an expert is merged while sampling
    session.restore()
    assert same(model, before)
    assert not model.diffusion_model._forward_pre_hooks or len(model.diffusion_model._forward_pre_hooks) == 1  # the spy


def test_merge_path_equals_training_time_network(foster_file):
    model = KModel(forge_unet())
    session = tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(foster_file, 0.7)])
    outs = sample(UnetPatcher(model), 8)
    session.restore()

    ref_unet = tiny_unet()
    ref = TSMNetwork.from_file(foster_file, ref_unet, [tiny_clip()], multiplier=0.7)
    ref.apply(text_encoder=False)
    ref.attach(ref_unet)
    ref_model = KModel(DiffusersCall(ref_unet))
    torch.testing.assert_close(outs, sample(UnetPatcher(ref_model), 8), rtol=1e-4, atol=1e-5)


def test_online_path_leaves_weights_untouched_and_equals_merge_path(foster_file):
    merge_model = KModel(forge_unet())
    session = tsm_forge.apply_to_unet(UnetPatcher(merge_model), [tsm_forge.TSMRequest(foster_file)])
    expected = sample(UnetPatcher(merge_model), 8)
    session.restore()
    plain = sample(UnetPatcher(KModel(forge_unet())), 8)
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(expected, plain))  # the experts do act

    model = KModel(forge_unet())
    before = snapshot(model)
    session = tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(foster_file, mode="online")])
    (run,) = session
    assert not run.merge
    checks = []
    outs = sample(UnetPatcher(model).clone(), 8, on_call=lambda sigma: checks.append(same(model, before)))
    assert all(checks) and run.calls == 8
    torch.testing.assert_close(outs, expected, rtol=1e-4, atol=1e-5)
    session.restore()
    assert same(model, before)
    assert all("forward" not in m.__dict__ for m in model.modules())  # forwards put back
    assert not model.diffusion_model._forward_pre_hooks


def test_quantized_weights_take_the_online_path(foster_file):
    qunet = forge_unet(QuantLinear)
    model = KModel(qunet, storage_dtype="nf4")  # backend/loader.py: storage_dtype is 'nf4'/'fp4'/'gguf'
    before = snapshot(model)
    session = tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(foster_file)])
    assert not session.runs[0].merge
    with pytest.raises(TSMFileError, match="mode=merge is impossible"):
        tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(foster_file, mode="merge")])
    checks = []
    outs = sample(UnetPatcher(model), 8, on_call=lambda sigma: checks.append(same(model, before)))
    assert all(checks)
    session.restore()
    assert same(model, before)

    ref_model = KModel(dequantized_copy(qunet))
    ref_session = tsm_forge.apply_to_unet(UnetPatcher(ref_model), [tsm_forge.TSMRequest(foster_file)])
    assert ref_session.runs[0].merge
    torch.testing.assert_close(outs, sample(UnetPatcher(ref_model), 8), rtol=1e-4, atol=1e-5)
    ref_session.restore()


def test_assembled_file_equals_tsm_network(assembled_file):
    model = KModel(forge_unet())
    before = snapshot(model)
    session = tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(assembled_file)])
    assert not session.runs[0].merge  # routers need the online path
    outs = sample(UnetPatcher(model), 8)
    session.restore()
    assert same(model, before)

    ref_unet = tiny_unet()
    ref = TSMNetwork.from_file(assembled_file, ref_unet)
    ref.apply()
    ref.attach(ref_unet)
    ref_model = KModel(DiffusersCall(ref_unet))
    torch.testing.assert_close(outs, sample(UnetPatcher(ref_model), 8), rtol=1e-4, atol=1e-5)


def test_two_files_one_merges_the_other_runs_online(foster_file, assembled_file):
    model = KModel(forge_unet())
    before = snapshot(model)
    base = UnetPatcher(model)
    session = tsm_forge.apply_to_unet(
        base,
        [
            tsm_forge.TSMRequest(foster_file),
            tsm_forge.TSMRequest(foster_file, 0.5),
            tsm_forge.TSMRequest(assembled_file),
        ],
    )
    assert [r.merge for r in session] == [True, False, False]
    sample(base, 4)
    assert [r.calls for r in session] == [4, 4, 4]
    session.restore()
    assert same(model, before)


def test_a_wrapper_that_replaces_the_slot_and_tiles_still_gets_the_expert(foster_file):
    """extensions-builtin/sd_forge_multidiffusion/lib_multidiffusion/tiled_diffusion.py: ``model.clone();
    model.set_model_unet_function_wrapper(implement)`` replaces the slot (no chaining) and ``implement``
    calls ``model_function(x_tile, t_tile, **c_tile)`` per tile. Before, TSM lived in that slot and was lost."""
    model = KModel(forge_unet())
    session = tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(foster_file)])
    tiled = UnetPatcher(model).clone()

    def implement(apply_model, args):  # two horizontal tiles, no overlap
        x = args["input"]
        halves = [
            apply_model(x[..., :4], args["timestep"], **args["c"]),
            apply_model(x[..., 4:], args["timestep"], **args["c"]),
        ]
        return torch.cat(halves, -1)

    tiled.set_model_unet_function_wrapper(implement)
    seen = _record(model, session)
    sample(tiled, 4)
    assert len(seen) == 8 and session.runs[0].calls == 8
    assert all(active == expert_index(t, 8)[0].item() for t, (active,) in seen)
    session.restore()


def test_flux_diffusers_names_map_to_row_slices_of_fused_layers():
    """Forge's ``model_lora_keys_unet`` gives Flux diffusers names as ``(key, (0, offset, size))``
    (packages_3rdparty/comfyui_lora_collection/lora.py + utils.flux_to_diffusers)."""
    km = nn.Module()
    km.diffusion_model = nn.Module()
    fused = ForgeLinear(nn.Linear(4, 12))
    km.diffusion_model.qkv = fused
    index = tsm_forge.diffusers_name_index(
        km,
        {
            "lora_transformer_a_to_k": ("diffusion_model.qkv.weight", (0, 4, 4)),
            "lora_transformer_a_to_out_0": "diffusion_model.qkv.weight",
            "lora_transformer_bias": "diffusion_model.qkv.bias",
        },
    )
    assert set(index) == {"lora_transformer_a_to_k", "lora_transformer_a_to_out_0"}
    piece = index["lora_transformer_a_to_k"]
    assert isinstance(piece, tsm_forge.RowSlice) and piece.fused_parent is fused
    assert torch.equal(piece.weight, fused.weight[4:8])
    assert tsm_forge.is_quantized(tsm_forge.RowSlice(QuantLinear(nn.Linear(4, 12)), 4, 4))


def test_layer_index_finds_forge_linears_under_sgm_names():
    sgm = nn.Module()
    sgm.input_blocks = nn.ModuleList([nn.Module() for _ in range(5)])
    sgm.input_blocks[4].add_module("1", nn.Module())
    layer = ForgeLinear(nn.Linear(8, 8))
    getattr(sgm.input_blocks[4], "1").proj_in = layer
    getattr(sgm.input_blocks[4], "1").conv = nn.Conv2d(4, 4, 3)
    index = tsm_forge.forge_layer_index(sgm)
    assert set(index) == {"lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_conv"}
    from tsm_trainer.runtime.online import resolve_layers

    assert resolve_layers(["lora_unet_down_blocks_1_attentions_0_proj_in"], index) == {
        "lora_unet_down_blocks_1_attentions_0_proj_in": layer
    }
    assert tsm_forge.is_quantized(QuantLinear(nn.Linear(4, 4))) and not tsm_forge.is_quantized(layer)
    assert isinstance(_LinearView(layer, 8, 8, "cpu", torch.float32), nn.Linear)


def test_processing_lifecycle_with_hires_pass(foster_file):
    model = KModel(forge_unet())
    clip = CLIP(CLIPHolder())
    sd_model = type("SD", (), {})()
    sd_model.forge_objects_original = ForgeObjects(UnetPatcher(model), clip)
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects_original.shallow_copy()
    p = type("P", (), {})()
    p.sd_model = sd_model
    name = os.path.splitext(os.path.basename(foster_file))[0]
    controller = tsm_forge.Controller(lambda n: foster_file if n == name else None, model_lora_keys_clip, load_lora)

    # Forge's LoraLoader.refresh (backend/patcher/lora.py, @torch.inference_mode) replaces weights with
    # inference tensors: merging and restoring must still work.
    with torch.inference_mode():
        for m in model.diffusion_model.modules():
            if isinstance(m, ForgeLinear):
                m.weight = nn.Parameter(m.weight.clone(), requires_grad=False)
    before = snapshot(model)

    # modules/processing.py process_images_inner: activate, shallow copy, process_batch, setup_conds, sample
    p.sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    controller.activate(p, [ExtraNetworkParams([name, "0.5", "0.8"])])
    assert [(r.te_multiplier, r.unet_multiplier) for r in p.tsm_requests] == [(0.5, 0.8)]
    p.sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    controller.process_batch(p)
    te_clip = p.sd_model.forge_objects.clip
    assert te_clip is not clip and not clip.lora_patches  # a clone is patched, the original untouched
    ((key, patches),) = te_clip.lora_patches.items()
    assert key == (f"tsm:{foster_file}", 0.5, 1.0, False)
    te = text_encoder_lora(load_file(foster_file)[0])
    assert len(patches) == len({k.split(".")[0] for k in te})
    # first pass; then the hires pass, for which modules/processing.py sample_hr_pass calls
    # process_before_every_sampling twice (after before_hr, and again after resetting forge_objects)
    for calls_before_sampling in (1, 2):
        for _ in range(calls_before_sampling):
            p.sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
            controller.process_before_every_sampling(p)
        sample(p.sd_model.forge_objects.unet, 4)
    assert not same(model, before)
    p.extra_generation_params = {}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        controller.finish(p)  # post_sample
        controller.finish(p)  # postprocess
    assert not [x for x in w if "TSM" in str(x.message)]  # no false "never called"
    assert same(model, before) and not model.diffusion_model._forward_pre_hooks
    assert "TSM notice" not in p.extra_generation_params

    # a run with no tag leaves everything as is; an unknown name is a clear error
    controller.activate(p, [])
    p.sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    controller.process_batch(p)
    controller.process_before_every_sampling(p)
    assert controller.session is None and not model.diffusion_model._forward_pre_hooks
    with pytest.raises(TSMFileError, match="no such TSM file"):
        controller.activate(p, [ExtraNetworkParams(["missing"])])


def test_never_called_unet_warns_at_the_end_only(foster_file):
    model = KModel(forge_unet())
    before = snapshot(model)
    controller = tsm_forge.Controller(lambda n: foster_file)
    p = type("P", (), {})()
    p.sd_model = type("SD", (), {})()
    p.sd_model.forge_objects = ForgeObjects(UnetPatcher(model), None)
    controller.activate(p, [ExtraNetworkParams(["x", "1", "1", "mode=online"])])
    controller.process_before_every_sampling(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        controller.process_before_every_sampling(p)  # replaced unused: Forge's hires double call
        assert not w
        controller.finish(p)
    assert any("never called" in str(x.message) for x in w)
    assert same(model, before) and all("forward" not in m.__dict__ for m in model.modules())


def test_mixed_interval_batch_goes_online_and_is_reported_in_the_output_info(foster_file):
    model = KModel(forge_unet())
    before = snapshot(model)
    controller = tsm_forge.Controller(lambda n: foster_file)
    p = type("P", (), {"extra_generation_params": {}})()
    p.sd_model = type("SD", (), {})()
    p.sd_model.forge_objects = ForgeObjects(UnetPatcher(model), None)
    controller.activate(p, [ExtraNetworkParams(["x"])])
    controller.process_before_every_sampling(p)
    sigmas = model.predictor.sigmas[[10, 990]]
    cond, uncond = _conds()
    with torch.no_grad():
        model.apply_model(torch.randn(2, 4, 8, 8), sigmas, c_crossattn=torch.cat([cond, uncond]))
    assert not controller.session.runs[0].merge
    controller.finish(p)
    assert "different experts" in p.extra_generation_params["TSM notice"]
    assert same(model, before)


def test_an_error_while_sampling_restores_and_stops_the_generation(foster_file):
    model = KModel(forge_unet())
    before = snapshot(model)
    session = tsm_forge.apply_to_unet(UnetPatcher(model), [tsm_forge.TSMRequest(foster_file)])
    session.runs[0].runtime.experts.remove(7)  # as a single-interval file lacking expert 7
    with pytest.raises(
        TSMSamplingError, match="t=999.0 needs expert 7 .*the base weights were restored; generation stopped"
    ):
        sample(UnetPatcher(model), 8)
    assert same(model, before) and not model.diffusion_model._forward_pre_hooks


def test_parse_params():
    assert tsm_forge.parse_params(["a"]) == ("a", 1.0, 1.0, "auto")
    assert tsm_forge.parse_params(["a", "0.5"]) == ("a", 0.5, 0.5, "auto")
    assert tsm_forge.parse_params(["a", "0.5", "0.8", "mode=online"]) == ("a", 0.8, 0.5, "online")
    with pytest.raises(ValueError, match="mode"):
        tsm_forge.parse_params(["a", "mode=fast"])
    assert math.isclose(tsm_forge.parse_params(["a", "te=0.2"])[2], 0.2)
