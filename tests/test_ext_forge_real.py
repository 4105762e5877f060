"""The Forge extension inside REAL Forge code (stable-diffusion-webui-forge, pinned dfdcbab6).

Skipped unless ``TSM_FORGE_DIR`` points at a checkout of that commit. Imports Forge's own
``backend`` (UNet and Flux classes built with ``backend.operations.using_forge_operations``, ``KModel``,
the predictors, ``UnetPatcher``, ``sampling_function_inner``, ``backend.patcher.lora``), its
``k_diffusion`` sampler and the builtin MultiDiffusion extension; no stub. Needs Forge's Python
dependencies (einops, torchsde, torchdiffeq, scipy, sentencepiece; see extensions/sd-forge-tsm/README.md);
torchvision is import-stubbed (tests/fakes/torchvision_stub.py):

    TSM_FORGE_DIR=/work/real/forge /work/venvs/comfy/bin/python -m pytest tests/test_ext_forge_real.py -q

Run the Forge and ComfyUI real-code files in separate pytest processes: each puts its tool's
top-level packages on sys.path, and the two were not tried in one process.
"""

import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

FORGE = os.environ.get("TSM_FORGE_DIR")
pytestmark = pytest.mark.skipif(not FORGE, reason="TSM_FORGE_DIR does not point at a Forge checkout")

if FORGE:
    sys.path[:0] = [
        FORGE,
        os.path.join(FORGE, "packages_3rdparty"),
        os.path.join(FORGE, "extensions-builtin", "sd_forge_multidiffusion"),
    ]
    sys.argv = sys.argv[:1]  # backend/args.py parses the command line at import
    import backend.args

    backend.args.args.always_cpu = True  # no CUDA here
    from backend import operations
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import Prediction, PredictionFlux
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.mmditx import MMDiTX
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.patcher.unet import UnetPatcher
    from backend.sampling.condition import ConditionCrossAttn
    from backend.sampling.sampling_function import sampling_function_inner

    from tests.fakes import torchvision_stub

    torchvision_stub.install()  # k_diffusion/utils.py imports it for image helpers only
    from k_diffusion.sampling import get_sigmas_karras, sample_euler
    from lib_multidiffusion.tiled_diffusion import TiledDiffusion

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "extensions", "sd-forge-tsm")
)
import tsm_forge  # noqa: E402
from tsm_forge.forge_keys import unet_key_map  # noqa: E402
from tsm_trainer.core.file_format import TSMFileError, load_file  # noqa: E402
from tsm_trainer.core.intervals import expert_index  # noqa: E402
from tsm_trainer.runtime.sampling_session import TSMSamplingError  # noqa: E402

CPU = torch.device("cpu")


def _in_forge_operations(cls, **config):
    """``cls(**config)`` as backend/loader.py builds it (Forge's Linear/Conv classes, weights loaded from a
    state dict: Forge's Linear starts with ``weight = None``), with random weights."""
    torch.manual_seed(0)
    plain = cls(**config)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.2)
    with operations.using_forge_operations(device=CPU, dtype=torch.float32):
        model = cls(**config)
    model.load_state_dict(plain.state_dict())
    model.storage_dtype = model.computation_dtype = torch.float32  # backend/loader.py sets these
    return model


def _forge_unet():
    """A tiny SD1-shaped UNet of Forge's own class."""
    return _in_forge_operations(
        IntegratedUNet2DConditionModel,
        in_channels=4,
        model_channels=32,
        out_channels=4,
        num_res_blocks=1,
        channel_mult=(1, 2),
        num_head_channels=8,
        use_spatial_transformer=True,
        transformer_depth=[0, 1],
        context_dim=16,
        transformer_depth_output=[0, 0, 1, 1],
        transformer_depth_middle=-1,
        use_linear_in_transformer=True,
    )


def _patcher(diffusion_model, predictor, config=None):
    return UnetPatcher(KModel(diffusion_model, None, k_predictor=predictor, config=config), CPU, CPU)


def _lora_tensors(layers: dict, n: int = 8, rank: int = 2, seed: int = 1) -> dict:
    """A fostered file's tensors for ``{name: (in, out)}``: every expert of scale n, random factors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in layers.items():
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        for e in range(n):
            tensors[f"{name}.tsm.{n}.{e}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
            tensors[f"{name}.tsm.{n}.{e}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
    return tensors


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    from tests.tiny_models import tiny_unet
    from tsm_trainer import TSMConfig, TSMNetwork

    path = str(tmp_path_factory.mktemp("m") / "m.safetensors")
    TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=2.0), tiny_unet()).save(path)
    return load_file(path)[1]


def _attention_file(unet, metadata):
    index = tsm_forge.forge_layer_index(unet)
    layers = {k: (m.weight.shape[1], m.weight.shape[0]) for k, m in index.items() if "attn" in k}
    assert len(layers) == 24  # 3 transformer blocks x (attn1, attn2) x (q, k, v, out)
    return _lora_tensors(layers), dict(metadata)


def _conds():
    g = torch.Generator().manual_seed(7)
    cond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(torch.randn(1, 5, 16, generator=g))}}]
    uncond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(torch.randn(1, 5, 16, generator=g))}}]
    return cond, uncond


def _sample(unet_patcher, steps=8, size=(8, 8)):
    """Forge's k-diffusion Euler over Karras sigmas through Forge's real cond/uncond batching."""
    pred = unet_patcher.model.predictor
    sigmas = get_sigmas_karras(steps, float(pred.sigma_min), float(pred.sigma_max))
    cond, uncond = _conds()
    x = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(3)) * sigmas[0]

    def denoiser(x, sigma, **_):
        return sampling_function_inner(unet_patcher.model, x, sigma, uncond, cond, 5.0, unet_patcher.model_options)

    with torch.no_grad():
        return sample_euler(denoiser, x, sigmas, disable=True)


def _spy(kmodel, session):
    seen = []
    kmodel.diffusion_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[1].float(), [r.active for r in session])), with_kwargs=True
    )
    return seen


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(m, snap):
    return all(torch.equal(m.state_dict()[k], v) for k, v in snap.items())


def test_real_forge_unet_merge_follows_the_predictor_and_equals_online_and_restores(metadata, tmp_path):
    unet = _forge_unet()
    layer_types = {type(m) for k, m in tsm_forge.forge_layer_index(unet).items() if "attn" in k}
    assert {t.__module__ for t in layer_types} == {"backend.operations"}  # Forge's Linear, not nn.Linear
    tensors, meta = _attention_file(unet, metadata)
    patcher = _patcher(unet, Prediction(prediction_type="epsilon"))
    before = _snapshot(unet)
    plain = _sample(patcher)

    session = tsm_forge.apply_to_unet(
        patcher, [tsm_forge.TSMRequest("f.safetensors")], loader=lambda p: (tensors, meta)
    )
    assert session.runs[0].merge
    seen = _spy(patcher.model, session)
    merged = _sample(patcher)
    assert len(seen) == 8 and all(active == expert_index(t, 8)[0].item() for t, (active,) in seen)
    session.restore()
    assert _same(unet, before)

    session = tsm_forge.apply_to_unet(
        patcher, [tsm_forge.TSMRequest("f.safetensors", mode="online")], loader=lambda p: (tensors, meta)
    )
    online = _sample(patcher)
    session.restore()
    assert _same(unet, before) and all("forward" not in m.__dict__ for m in unet.modules())
    torch.testing.assert_close(online, merged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-3)
    torch.testing.assert_close(_sample(patcher), plain, rtol=0, atol=0)  # nothing left behind


def test_real_multidiffusion_replacing_the_wrapper_slot_still_gets_the_expert(metadata):
    """MultiDiffusion (extensions-builtin/sd_forge_multidiffusion) clones the UnetPatcher and *replaces*
    model_function_wrapper; before, the TSM wrapper lived in that slot and was silently dropped."""
    unet = _forge_unet()
    tensors, meta = _attention_file(unet, metadata)
    patcher = _patcher(unet, Prediction(prediction_type="epsilon"))
    before = _snapshot(unet)
    session = tsm_forge.apply_to_unet(
        patcher, [tsm_forge.TSMRequest("f.safetensors")], loader=lambda p: (tensors, meta)
    )
    (tiled,) = TiledDiffusion().apply(
        patcher, "MultiDiffusion", tile_width=64, tile_height=64, tile_overlap=32, tile_batch_size=1
    )
    seen = _spy(patcher.model, session)
    with_tsm = _sample(tiled, size=(8, 16))
    assert len(seen) > 8 and session.runs[0].calls == len(seen)  # every tile call
    assert all(active == expert_index(t, 8)[0].item() for t, (active,) in seen)
    session.restore()
    assert _same(unet, before)
    assert not torch.allclose(with_tsm, _sample(tiled, size=(8, 16)), atol=1e-3)


def test_real_forge_error_mid_sampling_restores_and_raises(metadata):
    unet = _forge_unet()
    tensors, meta = _attention_file(unet, metadata)
    tensors = {k: v for k, v in tensors.items() if ".tsm.8.7." not in k}  # a file without expert 7
    patcher = _patcher(unet, Prediction(prediction_type="epsilon"))
    before = _snapshot(unet)
    tsm_forge.apply_to_unet(patcher, [tsm_forge.TSMRequest("f.safetensors")], loader=lambda p: (tensors, meta))
    with pytest.raises(TSMSamplingError, match="needs expert 7 of scale 8.*the base weights were restored"):
        _sample(patcher)
    assert _same(unet, before) and not unet._forward_pre_hooks


class _Diffusers031Shift:
    """Forge calls ``FlowMatchEulerDiscreteScheduler.time_shift(None, mu, 1.0, sigmas)`` (k_prediction.py), valid
    with its pinned diffusers 0.31 (exponential shift, no ``self``); diffusers >= 0.33 reads ``self.config``.
    This is 0.31's formula, so Forge's real ``PredictionFlux`` builds with this project's diffusers."""

    @staticmethod
    def time_shift(_self, mu, sigma, t):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def _prediction_flux():
    import backend.modules.k_prediction as kp

    real = kp.FlowMatchEulerDiscreteScheduler
    kp.FlowMatchEulerDiscreteScheduler = _Diffusers031Shift
    try:
        return PredictionFlux()
    finally:
        kp.FlowMatchEulerDiscreteScheduler = real


def _forge_flux():
    flux = _in_forge_operations(
        IntegratedFluxTransformer2DModel,
        in_channels=4,
        vec_in_dim=8,
        context_in_dim=12,
        hidden_size=16,
        mlp_ratio=4.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[2, 2, 4],
        theta=10000,
        qkv_bias=True,
        guidance_embed=False,
    )
    flux.config = {
        "depth": 1,
        "depth_single_blocks": 1,
        "hidden_size": 16,
    }  # backend/loader.py: model.config = unet_config
    return flux


FLUX_DIFFUSERS = {  # diffusers Flux names (as trained by train_tsm.py / diffusers) -> (in, out)
    "lora_transformer_transformer_blocks_0_attn_to_q": (16, 16),
    "lora_transformer_transformer_blocks_0_attn_to_k": (16, 16),
    "lora_transformer_transformer_blocks_0_attn_to_v": (16, 16),
    "lora_transformer_transformer_blocks_0_attn_add_k_proj": (16, 16),
    "lora_transformer_transformer_blocks_0_attn_to_out_0": (16, 16),
    "lora_transformer_single_transformer_blocks_0_attn_to_q": (16, 16),
    "lora_transformer_single_transformer_blocks_0_proj_mlp": (16, 64),  # Forge's map assumes mlp_ratio 4
}


def _flux_inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 3, 12, generator=g), torch.randn(1, 8, generator=g))


def _flux_call(patcher, sigma):
    x, ctx, y = _flux_inputs()
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx, y=y)


@pytest.mark.parametrize("mode", ["merge", "online"])
def test_real_flux_diffusers_named_file_resolves_through_forges_key_map(metadata, mode):
    """Forge's own ``model_lora_keys_unet`` (through ``tsm_forge.forge_keys.unet_key_map``) maps
    diffusers names onto the fused qkv / linear1 rows; the file now resolves (before: "module(s) not
    in this model") and equals the same LoRA merged by hand into those rows."""
    flux = _forge_flux()
    config = SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev")
    patcher = _patcher(flux, _prediction_flux(), config)
    key_map = unet_key_map(patcher.model)
    tensors, meta = _lora_tensors(FLUX_DIFFUSERS), dict(metadata)
    with pytest.raises(TSMFileError, match="not in this model"):  # what Forge users got before
        tsm_forge.apply_to_unet(patcher, [tsm_forge.TSMRequest("flux.safetensors")], loader=lambda p: (tensors, meta))
    before = _snapshot(flux)
    sigma = 0.3  # PredictionFlux: the model receives sigma; t = 300 -> expert 2 of 8
    session = tsm_forge.apply_to_unet(
        patcher,
        [tsm_forge.TSMRequest("flux.safetensors", mode=mode)],
        loader=lambda p: (tensors, meta),
        key_map=key_map,
    )
    assert session.runs[0].merge == (mode == "merge")
    out = _flux_call(patcher, sigma)
    assert session.runs[0].calls == 1
    session.restore()
    assert _same(flux, before)

    # reference: expert 2's deltas written by hand into the fused rows Forge's map names
    ref = _forge_flux()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name in FLUX_DIFFUSERS:
            key, piece = (key_map[name], None) if isinstance(key_map[name], str) else key_map[name]
            w = modules[key[len("diffusion_model.") : -len(".weight")]].weight
            rows = w if piece is None else w.narrow(0, piece[1], piece[2])
            down, up = tensors[f"{name}.tsm.8.2.lora_down.weight"], tensors[f"{name}.tsm.8.2.lora_up.weight"]
            rows += up @ down  # alpha == rank
    torch.testing.assert_close(out, _flux_call(_patcher(ref, _prediction_flux(), config), sigma), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, _flux_call(patcher, sigma), atol=1e-4)


def test_real_sd3_diffusers_names_resolve_onto_forges_mmditx_rows(metadata):
    """SD3: Forge's map has no diffusers names at dfdcbab (commented out); unet_key_map adds them from Forge's
    own mmdit_to_diffusers. Merged expert = base + delta in the q/k/v rows of joint_blocks.N.*.attn.qkv."""
    from backend.modules.k_prediction import PredictionDiscreteFlow

    sd3 = _in_forge_operations(
        MMDiTX,
        input_size=8,
        patch_size=2,
        in_channels=4,
        depth=2,
        adm_in_channels=8,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 12, "out_features": 128}},
        pos_embed_max_size=8,
        num_patches=16,
    )
    sd3.config = {"depth": 2}  # backend/loader.py: model.config = unet_config
    patcher = _patcher(sd3, PredictionDiscreteFlow(shift=3.0), SimpleNamespace(huggingface_repo="stabilityai/sd3"))
    names = {
        "lora_transformer_transformer_blocks_1_attn_to_k": (128, 128),
        "lora_transformer_transformer_blocks_0_attn_add_v_proj": (128, 128),
    }
    tensors, meta = _lora_tensors(names), dict(metadata)
    key_map = unet_key_map(patcher.model)
    before = _snapshot(sd3)
    session = tsm_forge.apply_to_unet(
        patcher, [tsm_forge.TSMRequest("sd3.safetensors")], loader=lambda p: (tensors, meta), key_map=key_map
    )
    session.set_timestep(torch.tensor([700.0]))  # expert 5 of 8
    k_rows = sd3.joint_blocks[1].x_block.attn.qkv.weight[128:256]
    v_rows = sd3.joint_blocks[0].context_block.attn.qkv.weight[256:384]
    for rows, name, key in (
        (k_rows, "lora_transformer_transformer_blocks_1_attn_to_k", "joint_blocks.1.x_block.attn.qkv.weight"),
        (
            v_rows,
            "lora_transformer_transformer_blocks_0_attn_add_v_proj",
            "joint_blocks.0.context_block.attn.qkv.weight",
        ),
    ):
        lo = 128 if rows is k_rows else 256
        delta = tensors[f"{name}.tsm.8.5.lora_up.weight"] @ tensors[f"{name}.tsm.8.5.lora_down.weight"]
        torch.testing.assert_close(rows, before[key][lo : lo + 128] + delta, rtol=1e-5, atol=1e-5)
    changed = [k for k, v in sd3.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == ["joint_blocks.0.context_block.attn.qkv.weight", "joint_blocks.1.x_block.attn.qkv.weight"]
    session.restore()
    assert _same(sd3, before)
