"""The AUTOMATIC1111 extension (extensions/sd-webui-tsm) driven by the stand-ins of tests/fakes/a1111.py
(the A1111 objects it touches, for offline CI). tests/test_ext_a1111_real.py runs the same paths inside
the real webui."""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fakes.a1111 import (
    CFGDenoiser,
    CFGDenoiserParams,
    CompVisDenoiser,
    CompVisTimestepsDenoiser,
    ExtraNetworkParams,
    FakeLora,
    Network,
    NetworkModule,
    NetworkWeights,
    Processing,
    SDModel,
    ddim_timesteps,
    get_sigmas_karras,
    parse_prompt,
)
from tests.tiny_models import randomise as _randomise
from tests.tiny_models import tiny_clip, tiny_unet, write_assembled_file
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.core.file_format import TSMFileError
from tsm_trainer.core.intervals import expert_index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extensions" / "sd-webui-tsm"))
import tsm_a1111
from tsm_a1111 import TSMExtraNetworkCore, TSMSamplingError
from tsm_a1111.adapter import find_tsm_files, parse_params, timestep_from_sigma


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tsm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("TSM")
    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0, conv_rank=2), tiny_unet(), [tiny_clip()])
    _randomise(net, 0)
    net.save(str(folder / "f8.safetensors"))
    one = TSMNetwork(TSMConfig(scales=[8], interval=5, rank=2, alpha=1.0), tiny_unet(), [])
    _randomise(one, 1)
    one.save(str(folder / "only5.safetensors"))
    write_assembled_file(folder, "a81.safetensors")  # stage 2: [8, 1], routers non-zero
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(folder / "plain_lora.safetensors"))
    return folder


def _inputs(batch=1):
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randn(batch, 5, 16, generator=g),
        torch.randn(batch, 5, 16, generator=g),
    )


@pytest.fixture
def setup(tsm_dir):
    lora = FakeLora()
    sd = SDModel(tiny_unet(), tiny_clip())
    lora.assign_names(sd)
    core = TSMExtraNetworkCore(str(tsm_dir), lambda: sd, lambda: lora.host)
    yield sd, core, lora
    lora.remove()


def _state(sd):
    return {
        k: v.clone()
        for k, v in {
            **sd.model.diffusion_model.state_dict(),
            **{"te." + k: v for k, v in sd.cond_stage_model.wrapped.transformer.state_dict().items()},
        }.items()
    }


def _equal(sd, before):
    now = _state(sd)
    return all(torch.equal(now[k], v) for k, v in before.items())


LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_" + LAYER.replace(".", "_")


def _delta(path, e, multiplier=1.0):
    from tsm_trainer.core.file_format import load_file
    from tsm_trainer.core.lora_math import lora_delta
    from tsm_trainer.files.export import expert_lora

    tensors, _ = load_file(str(path))
    return multiplier * lora_delta(expert_lora(tensors, 8, e), KOHYA)


class Watch:
    """At each forward of one layer: the t the UNet received and the weight the layer ran with."""

    def __init__(self, sd):
        unet = sd.model.diffusion_model
        self.t, self.seen = None, []
        self.h = [
            unet.register_forward_pre_hook(
                lambda m, a: setattr(self, "t", float(torch.as_tensor(a[1]).reshape(-1)[0]))
            ),
            unet.get_submodule(LAYER).register_forward_hook(
                lambda m, a, o: self.seen.append((self.t, m.weight.detach().clone(), m.network_current_names))
            ),
        ]

    def merges(self):
        return sum(1 for i, s in enumerate(self.seen) if i == 0 or s[2] != self.seen[i - 1][2])

    def check(self, base, path, multiplier=1.0):
        for t, w, _ in self.seen:
            torch.testing.assert_close(
                w, base[LAYER + ".weight"] + _delta(path, expert_index(t, 8), multiplier), rtol=1e-5, atol=1e-6
            )

    def remove(self):
        for h in self.h:
            h.remove()


def _kdiffusion_pass(sd, core, sigmas):
    denoiser = CFGDenoiser(CompVisDenoiser(sd), [core.on_cfg_denoiser])
    x, c, uc = _inputs()
    for sigma in sigmas[:-1]:  # k-diffusion never evaluates the final sigma 0
        denoiser(x, sigma.reshape(1), c, uc)
    return denoiser


def _runs(experts):
    return sum(1 for i, e in enumerate(experts) if i == 0 or experts[i - 1] != e)


# -- tests ------------------------------------------------------------------------------------------
def test_prompt_syntax_and_multiplier():
    prompt, data = parse_prompt("a cat <tsm:f8:0.5> <lora:other:0.7> <tsm:sub/x>")
    assert prompt.strip() == "a cat"
    assert parse_params(data["tsm"], default_multiplier=0.8) == [("f8", 0.5), ("sub/x", 0.8)]
    with pytest.raises(ValueError, match="not a number"):
        parse_params([ExtraNetworkParams(["f8", "strong"])])


@pytest.mark.parametrize("schedule", ["default", "karras"])
@pytest.mark.parametrize("steps", [4, 8, 30])
def test_kdiffusion_expert_follows_sigma_to_t(setup, tsm_dir, steps, schedule):
    sd, core, lora = setup
    before = _state(sd)
    wrap = CompVisDenoiser(sd)
    sigmas = (
        wrap.get_sigmas(steps)
        if schedule == "default"
        else get_sigmas_karras(steps, wrap.sigmas[0].item(), wrap.sigmas[-1].item())
    )
    _, data = parse_prompt("<tsm:f8:1.0>")
    p = Processing()
    core.activate(p, data["tsm"])
    assert p.extra_generation_params["TSM"] == "f8: 1"
    watch = Watch(sd)
    _kdiffusion_pass(sd, core, sigmas)
    watch.remove()
    assert len(sd.received) == steps
    experts = [expert_index(float(t[0]), 8) for t in sd.received]
    assert [e for _, e in core.session.calls] == experts
    watch.check(before, tsm_dir / "f8.safetensors")
    assert watch.merges() == _runs(experts) <= 8
    core.deactivate(p)
    assert _equal(sd, before) and lora.loaded_networks == []


def test_ddim_timesteps_are_the_timestep(setup, tsm_dir):
    sd, core, _ = setup
    before = _state(sd)
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    denoiser = CFGDenoiser(CompVisTimestepsDenoiser(sd), [core.on_cfg_denoiser])
    watch = Watch(sd)
    x, c, uc = _inputs()
    timesteps = ddim_timesteps(20)
    for t in timesteps:  # sd_samplers_timesteps_impl.ddim: model(x, timesteps[index].item() * s_in, ...)
        denoiser(x, t.item() * x.new_ones([1]), c, uc)
    watch.remove()
    assert [float(t[0]) for t in sd.received] == [float(t) for t in timesteps]
    watch.check(before, tsm_dir / "f8.safetensors")
    assert watch.merges() == 8
    core.deactivate(Processing())
    assert _equal(sd, before)


def test_output_matches_training_network_and_strength(setup, tsm_dir):
    """Stage 1 through the extension equals TSMNetwork.from_file at the t the UNet receives."""
    sd, core, _ = setup
    core.activate(Processing(), [ExtraNetworkParams(["f8", "0.5"])])
    wrap = CompVisDenoiser(sd)
    x, c, _ = _inputs()
    for t in (3.0, 400.0, 874.6, 990.0):
        sigma = wrap.t_to_sigma(torch.tensor([t]))
        core.on_cfg_denoiser(CFGDenoiserParams(x, None, sigma, 0, 1, c, c, CFGDenoiser(wrap, [])))
        t_unet = wrap.sigma_to_t(sigma)
        with torch.no_grad():
            out = sd.model.diffusion_model(x, t_unet, c).sample
        torch.testing.assert_close(
            out, _reference(str(tsm_dir / "f8.safetensors"), float(t_unet), 0.5), rtol=1e-4, atol=1e-5
        )
    core.deactivate()


@functools.cache
def _reference(path, t, multiplier=1.0):
    unet = tiny_unet()
    net = TSMNetwork.from_file(path, unet, [tiny_clip()], multiplier=multiplier)
    net.apply(text_encoder=False)
    net.attach(unet)
    x, c, _ = _inputs()
    with torch.no_grad():
        return unet(x, torch.tensor([t], dtype=torch.float64), c).sample


def test_stage2_file_equals_network(setup, tsm_dir):
    sd, core, _ = setup
    before = _state(sd)
    core.activate(Processing(), [ExtraNetworkParams(["a81"])])
    assert core.session.nets[0].tsm_state is None and len(core.session.online) == 1
    x, c, _ = _inputs()
    for t in (10.0, 400.0, 612.25, 990.0):
        with torch.no_grad():
            out = sd.model.diffusion_model(x, torch.tensor([t], dtype=torch.float64), c).sample
        torch.testing.assert_close(out, _reference(str(tsm_dir / "a81.safetensors"), t), rtol=1e-4, atol=1e-5)
    # and through a k-diffusion pass (per-sample t captured from the UNet call)
    _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(6))
    core.deactivate()
    assert _equal(sd, before)
    assert "forward" not in vars(sd.model.diffusion_model.get_submodule(LAYER))


def test_forward_replaced_by_args_kwargs_wrapper_and_two_files(setup, tsm_dir):
    """ControlNet (sd-webui-controlnet hook.py) replaces UNetModel.forward with ``forward_webui(*args,
    **kwargs)`` before extra networks activate. An assembled file and a second <tsm> must still route,
    and nothing may stay wrapped afterwards (before: "called with no timestep set" until restart)."""
    sd, core, _ = setup
    unet = sd.model.diffusion_model
    original = unet.forward
    unet.forward = lambda *args, **kwargs: original(*args, **kwargs)
    before = _state(sd)
    core.activate(Processing(), [ExtraNetworkParams(["a81", "1"]), ExtraNetworkParams(["f8", "0.5"])])
    _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(4))
    core.deactivate()
    assert _equal(sd, before)
    assert all("forward" not in vars(m) for m in unet.modules() if m is not unet)
    x, c, _ = _inputs()
    with torch.no_grad():
        unet(x, torch.tensor([10.0]), c)  # no <tsm>: runs


def test_hires_fix_and_img2img_second_pass(setup, tsm_dir):
    sd, core, lora = setup
    before = _state(sd)
    wrap = CompVisDenoiser(sd)
    p = Processing()
    core.activate(p, [ExtraNetworkParams(["f8", "1"])])
    _kdiffusion_pass(sd, core, wrap.get_sigmas(10))
    # processing.py sample_hr_pass: extra_networks.activate(self, self.hr_extra_network_data) again,
    # then sampler.sample_img2img: sigma_sched = sigmas[steps - t_enc - 1:] (denoising strength 0.5)
    core.activate(p, [ExtraNetworkParams(["f8", "1"])])
    watch = Watch(sd)
    steps, t_enc = 12, 6
    sigmas = wrap.get_sigmas(steps)[steps - t_enc - 1 :]
    n_before = len(sd.received)
    _kdiffusion_pass(sd, core, sigmas)
    watch.remove()
    second = [expert_index(float(t[0]), 8) for t in sd.received[n_before:]]
    assert max(second) < 7  # img2img starts mid-schedule
    watch.check(before, tsm_dir / "f8.safetensors")
    core.deactivate(p)
    assert _equal(sd, before)
    # an interrupted generation that never reached deactivate() is cleaned up by the next activate
    core.activate(p, [ExtraNetworkParams(["f8"])])
    _kdiffusion_pass(sd, core, wrap.get_sigmas(3))
    core.activate(p, [])
    assert core.session is None and _equal(sd, before) and lora.loaded_networks == []


def test_text_encoder_lora_merged_for_the_generation(setup, tsm_dir):
    sd, core, lora = setup
    before = _state(sd)
    te = sd.cond_stage_model
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    lora.loaded_networks.clear()  # Lora's own activate (networks.load_networks) may run after TSM's
    q = (
        te.wrapped.transformer.get_submodule("text_model.encoder.layers.0.self_attn.q_proj")
        if hasattr(te.wrapped.transformer, "text_model")
        else next(m for n, m in te.wrapped.transformer.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    )
    seen = []
    h = q.register_forward_hook(lambda m, a, o: seen.append(m.weight.detach().clone()))
    with torch.no_grad():
        te(torch.tensor([[0, 5, 7, 1]]))
    h.remove()
    from tsm_trainer.core.file_format import load_file
    from tsm_trainer.core.lora_math import lora_delta
    from tsm_trainer.files.export import text_encoder_lora

    tensors, _ = load_file(str(tsm_dir / "f8.safetensors"))
    key = next(k for k, v in te.wrapped.transformer.named_modules() if v is q) + ".weight"
    torch.testing.assert_close(
        seen[0],
        before["te." + key]
        + lora_delta(text_encoder_lora(tensors), "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    )
    core.deactivate()
    assert _equal(sd, before)


def test_coexists_with_ordinary_loras_and_per_step_weights(setup, tsm_dir):
    """A <lora:...> on a layer TSM also targets, whose multiplier changes at every step (loractl):
    Lora re-merges from its own backup each time, and the expert stays in (before: wiped)."""
    sd, core, lora = setup
    unet = sd.model.diffusion_model
    base = _state(sd)
    layer = unet.get_submodule(LAYER)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(layer.weight.shape, generator=g) * 0.1

    class Plain(NetworkModule):
        def calc_updown(self, target):
            return self.finalize_updown(delta.clone(), target, delta.shape)

    plain = Network("other", None)
    plain.modules[layer.network_layer_name] = Plain(plain, NetworkWeights("k", layer.network_layer_name, {}, layer))
    lora.loaded_networks.append(plain)  # <lora:other:1> activated in the same prompt

    def loractl(params):
        plain.unet_multiplier = 1.0 - 0.1 * params.sampling_step

    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    watch = Watch(sd)
    denoiser = CFGDenoiser(CompVisDenoiser(sd), [loractl, core.on_cfg_denoiser])
    x, c, uc = _inputs()
    for sigma in CompVisDenoiser(sd).get_sigmas(6)[:-1]:
        denoiser(x, sigma.reshape(1), c, uc)
    watch.remove()
    for t, w, key in watch.seen:
        mult = next(k[2] for k in key if k[0] == "other")
        torch.testing.assert_close(
            w,
            base[LAYER + ".weight"] + mult * delta + _delta(tsm_dir / "f8.safetensors", expert_index(t, 8)),
            rtol=1e-5,
            atol=1e-6,
        )
    core.deactivate()
    # the LoRA is still applied exactly as Lora believes, TSM is gone
    assert torch.equal(layer.network_weights_backup[0], base[LAYER + ".weight"])
    torch.testing.assert_close(layer.weight, base[LAYER + ".weight"] + plain.unet_multiplier * delta)
    lora.loaded_networks.clear()
    with torch.no_grad():
        unet(*_inputs()[:1], torch.tensor([10]), _inputs()[1])
    assert _equal(sd, base)


def test_errors_during_sampling_stop_the_generation(setup, tsm_dir):
    """A1111 prints and ignores exceptions from on_cfg_denoiser and from activate(); the generation must
    stop with the message anyway (before: a stale expert, no sign in the output)."""
    sd, core, _ = setup
    before = _state(sd)
    core.activate(Processing(), [ExtraNetworkParams(["only5", "1"])])
    with pytest.raises(TSMSamplingError, match="needs expert 7 of scale 8.*holds \\[5\\]"):
        _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(4))
    core.deactivate()
    assert _equal(sd, before)
    # a batch whose samples fall in different experts
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    x, c, _ = _inputs(2)
    wrap = CompVisDenoiser(sd)
    denoiser = CFGDenoiser(wrap, [core.on_cfg_denoiser])
    with pytest.raises(TSMSamplingError, match="different experts"):
        denoiser(x, wrap.t_to_sigma(torch.tensor([100.0, 900.0])), c, c)
    assert len(denoiser.swallowed) == 1
    core.deactivate()
    # activate() failing: modules/extra_networks.py prints it and calls activate(p, []) again
    p = Processing()
    with pytest.raises(TSMFileError, match="no TSM file named 'nope'"):
        core.activate(p, [ExtraNetworkParams(["nope"])])
    core.activate(p, [])
    with pytest.raises(TSMSamplingError, match="no TSM file named 'nope'"):
        _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(2))
    core.deactivate(p)
    _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(2))  # the next generation runs


def test_expert_lookup_moves_t_to_cpu_before_float64(setup):
    """MPS has no float64: the interval lookup must never make a float64 tensor on the sampler's device.
    Every float64 conversion must see a CPU tensor (checked on the ops themselves)."""
    from torch.overrides import TorchFunctionMode

    sd, core, _ = setup
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    state = core.session.nets[0].tsm_state
    bad = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if (
                isinstance(out, torch.Tensor)
                and out.dtype == torch.float64
                and args
                and isinstance(args[0], torch.Tensor)
                and args[0].device.type != "cpu"
            ):
                bad.append(func)
            return out

    sigma = torch.tensor([3.0, 3.0], dtype=torch.float16, device="meta")  # a non-CPU device on any machine
    with Spy(), pytest.raises(NotImplementedError):  # meta tensors hold no values: the CPU copy fails
        state.set_timestep(sigma)
    assert bad == []
    assert state.set_timestep(torch.tensor([130.0, 130.0], dtype=torch.float16)) == 1
    core.deactivate()


def test_card_page_lists_tsm_files_with_intervals(tsm_dir):
    found = find_tsm_files(str(tsm_dir))
    assert {"f8", "a81", "_part8", "_part1"} <= set(found) and "plain_lora" not in found
    from tsm_trainer.core.file_format import read_metadata

    text = tsm_a1111.card_description(read_metadata(found["f8"]))
    assert "TSM foster" in text and "scales 8" in text and "[0,125)" in text and "[875,1000)" in text
    assert "asymmetric mixture" in tsm_a1111.card_description(read_metadata(found["a81"]))
    item = tsm_a1111.card_item_fields(
        "f8", read_metadata(found["f8"]), found["f8"], "opts.extra_networks_default_multiplier"
    )
    assert item["prompt"] == '"<tsm:f8:" + opts.extra_networks_default_multiplier + ">"'


def test_flow_and_unknown_names(setup):
    assert float(timestep_from_sigma(torch.tensor([0.5]), None, "flow")[0]) == 500.0
    with pytest.raises(RuntimeError, match="1.8.0 or newer"):
        timestep_from_sigma(torch.tensor([1.0]), None, "ddpm")
    _, core, _ = setup
    with pytest.raises(ValueError, match="no TSM file named 'missing'"):
        core.activate(Processing(), [ExtraNetworkParams(["missing"])])


def test_open_clip_qv_lora_merged_through_lora_multihead_attention():
    """SD2 / SDXL-te2 OpenCLIP (ldm FrozenOpenCLIPEmbedder .model.transformer.resblocks[i].attn / .mlp):
    q/k/v are row blocks of attn.in_proj_weight; Lora merges a MultiheadAttention only when q, k, v and
    out modules all exist, so a q/v-only LoRA gets zero k and out."""
    from tsm_a1111.adapter import text_encoder_layer_index
    from tsm_a1111.lora_network import build_network

    lora = FakeLora()
    block = torch.nn.Module()
    block.attn = torch.nn.MultiheadAttention(8, 2)
    block.mlp = torch.nn.Module()
    block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.resblocks = torch.nn.ModuleList([block])
    cond = torch.nn.Module()
    cond.wrapped = torch.nn.Module()
    cond.wrapped.model = model
    sd = types.SimpleNamespace(cond_stage_model=cond, model=torch.nn.Module())
    lora.assign_names(sd)
    index = text_encoder_layer_index(sd)
    assert index["lora_te_text_model_encoder_layers_0_mlp_fc1"] == (block.mlp.c_fc, None)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for part in ("q", "v"):
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{part}_proj"
        tensors.update(
            {
                f"{name}.lora_down.weight": torch.randn(2, 8, generator=g),
                f"{name}.lora_up.weight": torch.randn(8, 2, generator=g),
                f"{name}.alpha": torch.tensor(2.0),
            }
        )
    te_layers = {k.split(".")[0]: index[k.split(".")[0]] for k in tensors}
    net = build_network(lora.network, "x", "x.safetensors", tensors, {"scales": [1]}, 0.5, None, te_layers)
    before = block.attn.in_proj_weight.detach().clone(), block.attn.out_proj.weight.detach().clone()
    lora.loaded_networks.append(net)
    with torch.no_grad():
        block.attn(torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8))
    w = block.attn.in_proj_weight.detach()
    for j, part in enumerate("qkv"):
        rows = slice(8 * j, 8 * (j + 1))
        if part == "k":
            assert torch.equal(w[rows], before[0][rows])
        else:
            name = f"lora_te_text_model_encoder_layers_0_self_attn_{part}_proj"
            torch.testing.assert_close(
                w[rows], before[0][rows] + 0.5 * tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
            )
    assert torch.equal(block.attn.out_proj.weight, before[1]) and lora.errors == {}
    lora.remove()


def test_out_of_memory_while_merging_stops_instead_of_a_half_merged_model(setup, monkeypatch):
    """Lora counts a RuntimeError from calc_updown (torch.OutOfMemoryError is one) and samples on with
    the layer half-merged; TSM turns it into an error that stops the generation."""
    from tsm_a1111 import lora_network

    sd, core, lora = setup

    def oom(self, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(lora_network._Pair, "delta", oom)
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    with pytest.raises(TSMSamplingError, match="out of memory merging expert"):
        _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(2))
    assert lora.errors == {}
    monkeypatch.undo()
    core.deactivate()


def test_fostered_path_runs_on_torch_2_1_autocast_api(setup, tsm_dir, monkeypatch):
    """A1111's default torch is 2.1.2, whose ``torch.is_autocast_enabled()`` takes no device type."""
    sd, core, _ = setup
    before = _state(sd)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda: False)
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    watch = Watch(sd)
    _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(4))
    watch.remove()
    watch.check(before, tsm_dir / "f8.safetensors")
    core.deactivate()
    assert _equal(sd, before)
