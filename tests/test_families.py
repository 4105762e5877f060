"""Every supported family end to end on tiny random models: detection, targets, key names,
per-sample expert routing through the real diffusers forward, text-encoder keys, overrides."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import tiny_clip, tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl_unet, tiny_t5, tiny_unet, tiny_unet3d
from torch import nn

from tsm_trainer.core.intervals import expert_index
from tsm_trainer.core.key_names import diffusers_unet_to_sgm
from tsm_trainer.core.network import TSMConfig, TSMNetwork
from tsm_trainer.core.targets import CONV_TARGETS, compile_patterns
from tsm_trainer.families import detect_family

N = 4  # scale under test
B = 3
# Timesteps chosen away from interval edges: experts 0, 2, 3 of scale 4; expert 1 unused.
T_DDPM = [100, 600, 900]
SIGMAS = [0.1, 0.6, 0.9]
EXPECTED_EXPERTS = [0, 2, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and avoids OpenMP spin-waits that make the
    file take minutes when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ehs(dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 5, dim, generator=g)


def _randn(*shape, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Each case: (model, kwargs as the diffusers pipeline passes them, batched kwarg names, t on the 0..T axis).
def case_sd1():
    m = tiny_unet()
    kw = dict(sample=_randn(B, 4, 8, 8), timestep=torch.tensor(T_DDPM), encoder_hidden_states=_ehs(16))
    return m, kw, torch.tensor(T_DDPM, dtype=torch.float64)


def case_sd2():
    m = tiny_unet(cross_attention_dim=1024)
    kw = dict(sample=_randn(B, 4, 8, 8), timestep=torch.tensor(T_DDPM), encoder_hidden_states=_ehs(1024))
    return m, kw, torch.tensor(T_DDPM, dtype=torch.float64)


def case_sdxl():
    m = tiny_sdxl_unet()
    kw = dict(
        sample=_randn(B, 4, 8, 8),
        timestep=torch.tensor(T_DDPM),
        encoder_hidden_states=_ehs(16),
        added_cond_kwargs={
            "text_embeds": _randn(B, 16, seed=3),
            "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).repeat(B, 1),
        },
    )
    return m, kw, torch.tensor(T_DDPM, dtype=torch.float64)


def case_video():
    m = tiny_unet3d()
    # Video sample (B, C, F, H, W): the blocks fold frames (and pixels, in temporal attention) into the batch.
    kw = dict(sample=_randn(B, 4, 2, 8, 8), timestep=torch.tensor(T_DDPM), encoder_hidden_states=_ehs(16))
    return m, kw, torch.tensor(T_DDPM, dtype=torch.float64)


def case_sd3():
    m = tiny_sd3()
    sigma = torch.tensor(SIGMAS)
    # diffusers' StableDiffusion3Pipeline passes timestep = sigma * 1000.
    kw = dict(
        hidden_states=_randn(B, 4, 8, 8),
        encoder_hidden_states=_ehs(16),
        pooled_projections=_randn(B, 16, seed=3),
        timestep=sigma * 1000,
    )
    return m, kw, (sigma * 1000).double()


def case_flux():
    m = tiny_flux()
    sigma = torch.tensor(SIGMAS)
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), ys.flatten(), xs.flatten()], 1)
    # diffusers' FluxPipeline passes timestep = sigma (timesteps / 1000): the network maps it to t = sigma * T.
    kw = dict(
        hidden_states=_randn(B, 16, 4),
        encoder_hidden_states=_ehs(16),
        pooled_projections=_randn(B, 16, seed=3),
        timestep=sigma,
        img_ids=img_ids,
        txt_ids=torch.zeros(5, 3),
    )
    return m, kw, sigma.double() * 1000


def case_pixart():
    m = tiny_pixart()
    kw = dict(
        hidden_states=_randn(B, 4, 8, 8),
        encoder_hidden_states=_ehs(16),
        timestep=torch.tensor(T_DDPM),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return m, kw, torch.tensor(T_DDPM, dtype=torch.float64)


CASES = {
    "sd1": case_sd1,
    "sd2": case_sd2,
    "sdxl": case_sdxl,
    "video": case_video,
    "sd3": case_sd3,
    "flux": case_flux,
    "pixart": case_pixart,
}
UNET_FAMILIES = {"sd1", "sd2", "sdxl", "video"}
DIFFUSERS_CLASS = {
    "sd1": "UNet2DConditionModel",
    "sd2": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "video": "UNet3DConditionModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "pixart": "PixArtTransformer2DModel",
}


def _slice(kw: dict, i: int) -> dict:
    """Sample i alone (shared inputs such as Flux's img_ids/txt_ids stay as they are)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, dict):
            out[k] = {kk: vv[i : i + 1] if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids"):
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


def _call(model, kw):
    return model(**kw, return_dict=False)[0]


def _build(family: str, **config):
    model, kw, t = CASES[family]()
    model.requires_grad_(False)
    net = TSMNetwork(TSMConfig(scales=[N], rank=2, alpha=2, **config), model, [])
    net.apply()
    net.attach(model)
    return model, kw, t, net


def _randomise_experts(net: TSMNetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.denoiser_loras:
            for e in range(N):
                up = lora.expert(N, e).lora_up.weight
                up.copy_(torch.randn(up.shape, generator=g) * 0.3)


def _only_expert(net: TSMNetwork, keep: int | None, saved: dict) -> None:
    """Restore the randomised ups, then zero every expert's up but ``keep``'s."""
    with torch.no_grad():
        for lora in net.denoiser_loras:
            for e in range(N):
                up = lora.expert(N, e).lora_up.weight
                up.copy_(saved[(lora.lora_name, e)] if e == keep else torch.zeros_like(up))


@pytest.mark.parametrize("family", list(CASES))
def test_detect_family(family):
    model = CASES[family]()[0]
    assert type(model).__name__ == DIFFUSERS_CLASS[family]
    fam = detect_family(model)
    assert fam.name == family
    assert fam.timestep_space == ("flow" if family in ("sd3", "flux") else "ddpm")
    assert fam.v2 == (family == "sd2")


@pytest.mark.parametrize("family", list(CASES))
def test_per_sample_routing_matches_single_samples(family):
    model, kw, t, net = _build(family)
    expected = expert_index(t, N).tolist()
    assert expected == EXPECTED_EXPERTS
    _randomise_experts(net)

    # Mixed batch with grad: only the experts of the batch's t enter the graph.
    out = _call(model, kw)
    assert out.shape[0] == B
    assert net.context.t.tolist() == pytest.approx(t.tolist())
    out.float().pow(2).sum().backward()
    for lora in net.denoiser_loras:
        for e in range(N):
            pair = lora.expert(N, e)
            if e in expected:
                assert pair.lora_down.weight.grad is not None, (lora.lora_name, e)
                assert pair.lora_up.weight.grad is not None, (lora.lora_name, e)
            else:
                assert pair.lora_down.weight.grad is None, (lora.lora_name, e)
                assert pair.lora_up.weight.grad is None, (lora.lora_name, e)
    grad_norm = sum(
        float(lora.expert(N, e).lora_up.weight.grad.abs().sum()) for lora in net.denoiser_loras for e in expected
    )
    assert grad_norm > 0

    saved = {
        (lora.lora_name, e): lora.expert(N, e).lora_up.weight.detach().clone()
        for lora in net.denoiser_loras
        for e in range(N)
    }
    with torch.no_grad():
        batch_out = _call(model, kw)
        torch.testing.assert_close(batch_out, out.detach(), atol=1e-6, rtol=1e-6)
        for i in range(B):
            single = _call(model, _slice(kw, i))
            assert net.context.t.tolist() == pytest.approx([t[i].item()])
            torch.testing.assert_close(single[0], batch_out[i], atol=1e-5, rtol=1e-5)
            # The sample depends on its own expert only ...
            _only_expert(net, expected[i], saved)
            torch.testing.assert_close(_call(model, _slice(kw, i))[0], batch_out[i], atol=1e-5, rtol=1e-5)
            # ... and that expert does change it.
            _only_expert(net, None, saved)
            base = _call(model, _slice(kw, i))[0]
            assert (base - batch_out[i]).abs().max() > 1e-3, (family, i)
            for lora in net.denoiser_loras:
                for e in range(N):
                    lora.expert(N, e).lora_up.weight.copy_(saved[(lora.lora_name, e)])
    net.remove()


@pytest.mark.parametrize("family", list(CASES))
def test_denoiser_key_prefix_and_defaults(family):
    model = CASES[family]()[0]
    net = TSMNetwork(TSMConfig(scales=[N], rank=2, alpha=2), model, [])
    names = [lora.lora_name for lora in net.denoiser_loras]
    prefix = "lora_unet_" if family in UNET_FAMILIES else "lora_transformer_"
    assert names and all(n.startswith(prefix) for n in names)
    assert len(set(names)) == len(names)
    # Default targets: attention projections (video: k and v only), nothing else.
    allowed = {
        "video": ("to_k", "to_v"),
        "flux": ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    }
    suffixes = allowed.get(family, ("to_q", "to_k", "to_v", "to_out_0"))
    assert all(n.endswith(suffixes) for n in names), names
    linear_paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    want = [
        p for p in linear_paths if re.search(r"\.(" + "|".join(s.replace("_0", r"\.0") for s in suffixes) + ")$", p)
    ]
    assert len(names) == len(want)
    # State dict keys are the file's keys.
    key = f"{names[0]}.tsm.{N}.{N - 1}.lora_up.weight"
    assert key in net.state_dict()
    assert f"{names[0]}.alpha" in net.state_dict()


def test_transformer_key_names():
    flux = {lora.lora_name for lora in TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_flux(), []).denoiser_loras}
    assert {
        "lora_transformer_transformer_blocks_0_attn_to_q",
        "lora_transformer_transformer_blocks_0_attn_add_k_proj",
        "lora_transformer_transformer_blocks_0_attn_to_add_out",
        "lora_transformer_transformer_blocks_0_attn_to_out_0",
        "lora_transformer_single_transformer_blocks_0_attn_to_v",
    } <= flux
    assert len(flux) == 8 + 3  # double block: q k v out + 4 context projections; single block: q k v
    sd3 = {lora.lora_name for lora in TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_sd3(), []).denoiser_loras}
    assert sd3 == {f"lora_transformer_transformer_blocks_0_attn_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0")}
    pixart = {lora.lora_name for lora in TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_pixart(), []).denoiser_loras}
    assert pixart == {
        f"lora_transformer_transformer_blocks_0_{a}_{p}"
        for a in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out_0")
    }
    video = {lora.lora_name for lora in TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_unet3d(), []).denoiser_loras}
    assert "lora_unet_down_blocks_0_temp_attentions_0_transformer_blocks_0_attn1_to_k" in video
    assert "lora_unet_transformer_in_transformer_blocks_0_attn1_v" not in video
    assert "lora_unet_transformer_in_transformer_blocks_0_attn1_to_v" in video


# -- SDXL: diffusers paths -> SGM names ---------------------------------------------------------
SDXL_EXPECTED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.1.conv1": "input_blocks.8.0.in_layers.2",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj": (
        "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj"
    ),
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": "middle_block.1.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (
        "output_blocks.0.1.transformer_blocks.0.attn1.to_out.0"
    ),
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v": "output_blocks.2.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "output_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0.conv2": "output_blocks.6.0.out_layers.3",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    "up_blocks.2.resnets.2.time_emb_proj": "output_blocks.8.0.emb_layers.1",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _sgm(path: str) -> str:
    return diffusers_unet_to_sgm(path, layers_per_block=2, up_blocks_with_attention=frozenset({0, 1}))


def test_sdxl_sgm_names_hand_written():
    model = tiny_sdxl_unet()
    paths = dict(model.named_modules())
    for src, dst in SDXL_EXPECTED.items():
        assert src in paths, src  # the tiny model really has that module
        assert _sgm(src) == dst, src
    # A block without attentions has its upsampler as layer 1 (SD1-style layouts).
    assert diffusers_unet_to_sgm("up_blocks.0.upsamplers.0.conv", 2, frozenset()) == "output_blocks.2.1.conv"
    assert diffusers_unet_to_sgm("up_blocks.1.upsamplers.0.conv", 1, frozenset({1})) == "output_blocks.3.2.conv"
    with pytest.raises(ValueError, match="no SGM name"):
        diffusers_unet_to_sgm("something.else")


def test_sdxl_sgm_mapping_is_injective_and_complete():
    model = tiny_sdxl_unet()
    paths = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    mapped = [_sgm(p) for p in paths]
    assert len(set(mapped)) == len(mapped)
    assert all(re.match(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.", s) for s in mapped)
    # SDXL layout: input/output blocks 0..8, middle block 0..2.
    ins = {int(s.split(".")[1]) for s in mapped if s.startswith("input_blocks.")}
    outs = {int(s.split(".")[1]) for s in mapped if s.startswith("output_blocks.")}
    mids = {int(s.split(".")[1]) for s in mapped if s.startswith("middle_block.")}
    assert ins == set(range(9)) and outs == set(range(9)) and mids == {0, 1, 2}
    # Attentions sit at layer 1 exactly where SDXL has them.
    attn_in = {int(s.split(".")[1]) for s in mapped if re.match(r"input_blocks\.\d+\.1\.", s)}
    attn_out = {int(s.split(".")[1]) for s in mapped if re.match(r"output_blocks\.\d+\.1\.transformer", s)}
    assert attn_in == {4, 5, 7, 8} and attn_out == {0, 1, 2, 3, 4, 5}


def test_sdxl_network_names_with_conv():
    model = tiny_sdxl_unet()
    net = TSMNetwork(TSMConfig(scales=[N], rank=2, alpha=2, conv_rank=2), model, [])
    names = {lora.lora_name: lora for lora in net.denoiser_loras}
    assert not any(re.search(r"down_blocks|up_blocks|mid_block", n) for n in names)
    for src in (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_v",
    ):
        assert "lora_unet_" + _sgm(src).replace(".", "_") in names
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q" in names
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    for conv in (
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_6_0_op",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_middle_block_0_in_layers_2",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_8_0_skip_connection",
    ):
        assert conv in names, conv
    up = names["lora_unet_output_blocks_2_2_conv"]
    assert tuple(up.expert(N, 0).lora_down.weight.shape) == (2, 16, 3, 3)
    # Exactly the diffusers convs that CONV_TARGETS names, each under its SGM name.
    conv_re = compile_patterns(CONV_TARGETS)
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d) and conv_re.search(p)]
    assert {"lora_unet_" + _sgm(p).replace(".", "_") for p in convs} == {n for n, lora in names.items() if lora.is_conv}
    # conv_in / conv_out / time embeddings are not targets.
    assert not any(
        n.startswith(("lora_unet_input_blocks_0_", "lora_unet_out_", "lora_unet_time_embed", "lora_unet_label_emb"))
        for n in names
    )


def test_sd1_names_stay_diffusers():
    net = TSMNetwork(TSMConfig(scales=[N], rank=2, conv_rank=2), tiny_unet(), [])
    names = {lora.lora_name for lora in net.denoiser_loras}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in names
    assert not any("input_blocks" in n for n in names)


# -- text encoders -----------------------------------------------------------------------------
def _te_names(net: TSMNetwork) -> set[str]:
    return {lora.lora_name for lora in net.text_encoder_loras}


def _clip_keys(prefix: str, projs) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(2) for p in projs}


T5_QV_KEYS = ("encoder_block_0_layer_0_SelfAttention_q", "encoder_block_0_layer_0_SelfAttention_v")


def test_text_encoder_keys_sd1_sd2():
    for unet in (tiny_unet(), tiny_unet(cross_attention_dim=1024)):
        net = TSMNetwork(TSMConfig(scales=[N], rank=2), unet, [tiny_clip()])
        assert _te_names(net) == _clip_keys("lora_te", ("q_proj", "v_proj"))


def test_text_encoder_keys_sdxl():
    net = TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_sdxl_unet(), [tiny_clip(), tiny_clip(with_projection=True)])
    assert _te_names(net) == _clip_keys("lora_te1", ("q_proj", "v_proj")) | _clip_keys("lora_te2", ("q_proj", "v_proj"))


def test_text_encoder_keys_sd3():
    net = TSMNetwork(
        TSMConfig(scales=[N], rank=2), tiny_sd3(), [tiny_clip(), tiny_clip(with_projection=True), tiny_t5()]
    )
    qkvo = ("q_proj", "k_proj", "v_proj", "out_proj")
    assert _te_names(net) == (
        _clip_keys("lora_te1", qkvo) | _clip_keys("lora_te2", qkvo) | {f"lora_te3_{k}" for k in T5_QV_KEYS}
    )


def test_text_encoder_keys_pixart_flux_video():
    net = TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_pixart(), [tiny_t5()])
    assert _te_names(net) == {f"lora_te_{k}" for k in T5_QV_KEYS}
    net = TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_flux(), [tiny_clip(), tiny_t5()])
    assert _te_names(net) == _clip_keys("lora_te1", ("q_proj", "v_proj")) | {f"lora_te3_{k}" for k in T5_QV_KEYS}
    net = TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_unet3d(), [tiny_clip()])
    assert _te_names(net) == _clip_keys("lora_te", ("out_proj",))
    # A missing encoder keeps the others' positions.
    net = TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_sd3(), [None, tiny_clip(with_projection=True), tiny_t5()])
    assert {n.split("_text_model")[0].split("_encoder_block")[0] for n in _te_names(net)} == {"lora_te2", "lora_te3"}


def test_text_encoder_lora_runs_without_timestep():
    clip, t5 = tiny_clip(), tiny_t5()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        clip_before = clip(ids).last_hidden_state
        t5_before = t5(ids).last_hidden_state
    net = TSMNetwork(TSMConfig(scales=[N], rank=2), tiny_sd3(), [clip, t5])
    net.apply()
    with torch.no_grad():
        for lora in net.text_encoder_loras:
            lora.lora_up.weight.normal_(0, 0.5)
        assert net.context.t is None
        clip_after = clip(ids).last_hidden_state
        t5_after = t5(ids).last_hidden_state
    assert (clip_after - clip_before).abs().max() > 1e-3
    assert (t5_after - t5_before).abs().max() > 1e-3
    net.remove()
    with torch.no_grad():
        torch.testing.assert_close(clip(ids).last_hidden_state, clip_before)


# -- user overrides ----------------------------------------------------------------------------
def test_denoiser_target_override():
    unet = tiny_unet()
    net = TSMNetwork(TSMConfig(scales=[N], rank=2, denoiser_targets=("attn2\\.to_k",)), unet, [])
    want = {"lora_unet_" + p.replace(".", "_") for p, _ in unet.named_modules() if p.endswith("attn2.to_k")}
    assert want and {lora.lora_name for lora in net.denoiser_loras} == want


def test_text_encoder_target_override():
    net = TSMNetwork(TSMConfig(scales=[N], rank=2, text_encoder_targets=("k_proj",)), tiny_unet(), [tiny_clip()])
    assert _te_names(net) == _clip_keys("lora_te", ("k_proj",))


def test_invalid_pattern_names_it():
    with pytest.raises(ValueError, match=re.escape("'to_q('")):
        TSMNetwork(TSMConfig(scales=[N], rank=2, denoiser_targets=("to_q(",)), tiny_unet(), [])


@pytest.mark.parametrize("patterns", [("no_such_layer",), ("o_q",), ("to_",)])
def test_patterns_matching_nothing_raise(patterns):
    # A pattern matches a whole trailing part of the path: "o_q" and "to_" don't match "attn1.to_q".
    with pytest.raises(ValueError, match="matches the targets"):
        TSMNetwork(TSMConfig(scales=[N], rank=2, denoiser_targets=patterns), tiny_unet(), [])


def test_sd_scripts_style_unet_without_config_and_inference_wrapper():
    """sd-scripts' original_unet keeps no cross_attention_dim config and gen_img wraps it in
    InferUNet2DConditionModel (an object holding the module as ``delegate``)."""
    import types

    from tsm_trainer import TSMConfig, TSMNetwork
    from tsm_trainer.families import detect_family

    class UNet2DConditionModel(nn.Module):  # sd-scripts' class name, holding no diffusers config
        def __init__(self, inner):
            super().__init__()
            for name, child in inner.named_children():
                self.add_module(name, child)
            self._inner = [inner]

        def forward(self, sample, timestep, encoder_hidden_states):
            return self._inner[0](sample, timestep, encoder_hidden_states)

    for cross, family in ((16, "sd1"), (1024, "sd2")):
        unet = UNet2DConditionModel(tiny_unet(cross_attention_dim=cross))
        wrapper = types.SimpleNamespace(delegate=unet)  # gen_img's InferUNet2DConditionModel
        assert detect_family(wrapper).name == family
    net = TSMNetwork(TSMConfig(scales=[4], rank=2), wrapper)
    assert net.family.name == "sd2" and net.denoiser_loras[0].lora_name.startswith("lora_unet_down_blocks_0_")
    net.apply()
    net.attach(wrapper)
    unet(torch.randn(1, 4, 8, 8), torch.tensor([900]), torch.randn(1, 5, 1024))
    assert net.context.t.tolist() == [900.0]
