"""The AUTOMATIC1111 extension (extensions/sd-webui-tsm) driven by stand-ins of the A1111 objects it
touches. Each stand-in keeps the real name and signature; the file it copies is cited
(AUTOMATIC1111/stable-diffusion-webui 1.6+, crowsonkb/k-diffusion)."""

from __future__ import annotations

import functools
import re
import sys
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_models import randomise as _randomise, tiny_clip, tiny_unet, write_assembled_file
from tsm_trainer import TSMConfig, TSMNetwork
from tsm_trainer.intervals import expert_index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extensions" / "sd-webui-tsm"))
import tsm_a1111  # noqa: E402
from tsm_a1111.adapter import TSMExtraNetworkCore, find_tsm_files, parse_params, timestep_from_sigma  # noqa: E402


# -- stand-ins --------------------------------------------------------------------------------------
class ExtraNetworkParams:
    """modules/extra_networks.py ExtraNetworkParams (verbatim logic)."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


re_extra_net = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py


def parse_prompt(prompt):
    """modules/extra_networks.py parse_prompt (without comment-line removal)."""
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


class CFGDenoiserParams:
    """modules/script_callbacks.py CFGDenoiserParams."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def append_zero(x):  # k_diffusion/sampling.py
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):  # k_diffusion/sampling.py
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


class DiscreteSchedule(torch.nn.Module):
    """k_diffusion/external.py DiscreteSchedule (sigma_to_t: log-sigma interpolation)."""

    def __init__(self, sigmas, quantize):
        super().__init__()
        self.register_buffer('sigmas', sigmas)
        self.register_buffer('log_sigmas', sigmas.log())
        self.quantize = quantize

    def get_sigmas(self, n=None):
        if n is None:
            return append_zero(self.sigmas.flip(0))
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n, device=self.sigmas.device)
        return append_zero(self.t_to_sigma(t))

    def sigma_to_t(self, sigma, quantize=None):
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = (low - log_sigma) / (low - high)
        w = w.clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


class CompVisDenoiser(DiscreteSchedule):
    """k_diffusion/external.py CompVisDenoiser (DiscreteEpsDDPMDenoiser): the UNet gets sigma_to_t(sigma)."""

    def __init__(self, model, quantize=False):
        super().__init__(((1 - model.alphas_cumprod) / model.alphas_cumprod) ** 0.5, quantize)
        self.inner_model = model

    def forward(self, input, sigma, **kwargs):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        eps = self.inner_model.apply_model(input * c_in[:, None, None, None], self.sigma_to_t(sigma), **kwargs)
        return input + eps * -sigma[:, None, None, None]


class CompVisTimestepsDenoiser(torch.nn.Module):
    """modules/sd_samplers_timesteps.py CompVisTimestepsDenoiser: the UNet gets the timestep itself."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiser:
    """modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward, the part that matters here: sigma_in for
    cond+uncond, the on_cfg_denoiser callback with denoiser=self, then inner_model(x_in, sigma_in, cond=...)."""

    def __init__(self, inner_model, callbacks):
        self.inner_model = inner_model  # CFGDenoiserKDiffusion / CFGDenoiserTimesteps .inner_model property
        self.callbacks = callbacks
        self.step = 0

    def __call__(self, x, sigma, cond, uncond):
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        params = CFGDenoiserParams(x_in, None, sigma_in, self.step, None, cond, uncond, self)
        for cb in self.callbacks:  # script_callbacks.cfg_denoiser_callback
            cb(params)
        out = self.inner_model(params.x, params.sigma, cond=torch.cat([params.text_cond, params.text_uncond]))
        self.step += 1
        return out


def alphas_cumprod_sd():
    """ldm make_beta_schedule("linear", 1000, 0.00085, 0.012): SD's scaled-linear schedule (float32 buffer)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def ddim_timesteps(steps):
    """modules/sd_samplers_timesteps.py CompVisSampler.get_timesteps; the samplers walk it backwards."""
    timesteps = torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
    return timesteps.flip(0)


class SDModel:
    """shared.sd_model, the parts the adapter and samplers touch (ldm LatentDiffusion layout)."""

    def __init__(self, unet, clip=None):
        self.model = types.SimpleNamespace(diffusion_model=unet)
        self.cond_stage_model = types.SimpleNamespace(wrapped=types.SimpleNamespace(transformer=clip))
        self.is_sdxl = False
        self.alphas_cumprod = alphas_cumprod_sd()
        self.received = []  # t the UNet received

    def apply_model(self, x, t, cond):
        self.received.append(torch.as_tensor(t).clone())
        with torch.no_grad():
            return self.model.diffusion_model(x, t, cond).sample


class Processing:
    """modules/processing.py StableDiffusionProcessing: what activate() reads or writes."""

    def __init__(self):
        self.extra_generation_params = {}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tsm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("TSM")
    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0, conv_rank=2), tiny_unet(), [tiny_clip()])
    _randomise(net, 0)
    net.save(str(folder / "f8.safetensors"))
    write_assembled_file(folder, "a81.safetensors")  # stage 2: [8, 1], routers non-zero
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(folder / "plain_lora.safetensors"))
    return folder


def _inputs(batch=1):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 5, 16, generator=g)


def _setup(tsm_dir, prepare_layer=None):
    sd = SDModel(tiny_unet(), tiny_clip())
    core = TSMExtraNetworkCore(str(tsm_dir), lambda: sd, prepare_layer=prepare_layer)
    return sd, core


def _state(sd):
    return {k: v.clone() for k, v in {**sd.model.diffusion_model.state_dict(),
                                     **{"te." + k: v for k, v in sd.cond_stage_model.wrapped.transformer.state_dict().items()}}.items()}


def _equal(sd, before):
    now = _state(sd)
    return all(torch.equal(now[k], v) for k, v in before.items())


def _check_active(sd, core, n=8):
    """Forward pre-hook on the UNet: at each call the merged expert is that of the t it receives."""
    def hook(module, args):
        t = float(torch.as_tensor(args[1]).reshape(-1)[0])
        assert core.session.switcher.active == expert_index(t, n), t
    return sd.model.diffusion_model.register_forward_pre_hook(hook)


def _kdiffusion_pass(sd, core, sigmas):
    denoiser = CFGDenoiser(CompVisDenoiser(sd), [core.on_cfg_denoiser])
    x, c, uc = _inputs()
    for sigma in sigmas[:-1]:  # k-diffusion never evaluates the final sigma 0
        denoiser(x, sigma.reshape(1), c, uc)


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
def test_kdiffusion_expert_follows_sigma_to_t(tsm_dir, steps, schedule):
    sd, core = _setup(tsm_dir)
    before = _state(sd)
    wrap = CompVisDenoiser(sd)
    sigmas = wrap.get_sigmas(steps) if schedule == "default" else \
        get_sigmas_karras(steps, wrap.sigmas[0].item(), wrap.sigmas[-1].item())
    _, data = parse_prompt("<tsm:f8:1.0>")
    p = Processing()
    core.activate(p, data["tsm"])
    assert p.extra_generation_params["TSM"] == "f8: 1"
    handle = _check_active(sd, core)
    _kdiffusion_pass(sd, core, sigmas)
    handle.remove()
    assert len(sd.received) == steps
    experts = [expert_index(float(t[0]), 8) for t in sd.received]
    assert [e for _, e in core.session.calls] == experts
    assert core.session.switcher.merges == _runs(experts) <= 8
    core.deactivate(p)
    assert _equal(sd, before)


def test_ddim_timesteps_are_the_timestep(tsm_dir):
    sd, core = _setup(tsm_dir)
    before = _state(sd)
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    denoiser = CFGDenoiser(CompVisTimestepsDenoiser(sd), [core.on_cfg_denoiser])
    handle = _check_active(sd, core)
    x, c, uc = _inputs()
    timesteps = ddim_timesteps(20)
    for t in timesteps:  # sd_samplers_timesteps_impl.ddim: model(x, timesteps[index].item() * s_in, ...)
        denoiser(x, t.item() * x.new_ones([1]), c, uc)
    handle.remove()
    assert [float(t[0]) for t in sd.received] == [float(t) for t in timesteps]
    assert core.session.switcher.merges == 8
    core.deactivate(Processing())
    assert _equal(sd, before)


def test_output_matches_training_network_and_strength(tsm_dir):
    """Stage 1 through the extension equals TSMNetwork.from_file at the t the UNet receives."""
    sd, core = _setup(tsm_dir)
    core.activate(Processing(), [ExtraNetworkParams(["f8", "0.5"])])
    wrap = CompVisDenoiser(sd)
    x, c, _ = _inputs()
    for t in (3.0, 400.0, 874.6, 990.0):
        sigma = wrap.t_to_sigma(torch.tensor([t]))
        core.on_cfg_denoiser(CFGDenoiserParams(x, None, sigma, 0, 1, c, c, CFGDenoiser(wrap, [])))
        t_unet = wrap.sigma_to_t(sigma)
        with torch.no_grad():
            out = sd.model.diffusion_model(x, t_unet, c).sample
        torch.testing.assert_close(out, _reference(str(tsm_dir / "f8.safetensors"), float(t_unet), 0.5),
                                   rtol=1e-4, atol=1e-5)
    core.deactivate()


@functools.lru_cache(maxsize=None)
def _reference(path, t, multiplier=1.0):
    unet = tiny_unet()
    net = TSMNetwork.from_file(path, unet, [tiny_clip()], multiplier=multiplier)
    net.apply(text_encoder=False)
    net.attach(unet)
    x, c, _ = _inputs()
    with torch.no_grad():
        return unet(x, torch.tensor([t], dtype=torch.float64), c).sample


def test_stage2_file_equals_network(tsm_dir):
    sd, core = _setup(tsm_dir)
    before = _state(sd)
    core.activate(Processing(), [ExtraNetworkParams(["a81"])])
    assert core.session.switcher is None and len(core.session.online) == 1
    x, c, _ = _inputs()
    for t in (10.0, 400.0, 612.25, 990.0):
        with torch.no_grad():
            out = sd.model.diffusion_model(x, torch.tensor([t], dtype=torch.float64), c).sample
        torch.testing.assert_close(out, _reference(str(tsm_dir / "a81.safetensors"), t), rtol=1e-4, atol=1e-5)
    # and through a k-diffusion pass (per-sample t captured from the UNet call)
    _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(6))
    core.deactivate()
    assert _equal(sd, before)
    assert "forward" not in vars(sd.model.diffusion_model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q)


def test_hires_fix_and_img2img_second_pass(tsm_dir):
    sd, core = _setup(tsm_dir)
    before = _state(sd)
    wrap = CompVisDenoiser(sd)
    p = Processing()
    core.activate(p, [ExtraNetworkParams(["f8", "1"])])
    handle = _check_active(sd, core)
    _kdiffusion_pass(sd, core, wrap.get_sigmas(10))
    first = core.session.switcher.merges
    # processing.py sample_hr_pass: extra_networks.activate(self, self.hr_extra_network_data) again,
    # then sampler.sample_img2img: sigma_sched = sigmas[steps - t_enc - 1:] (denoising strength 0.5)
    core.activate(p, [ExtraNetworkParams(["f8", "1"])])
    handle.remove()
    handle = _check_active(sd, core)
    steps, t_enc = 12, 6
    sigmas = wrap.get_sigmas(steps)[steps - t_enc - 1:]
    n_before = len(sd.received)
    _kdiffusion_pass(sd, core, sigmas)
    handle.remove()
    second = [expert_index(float(t[0]), 8) for t in sd.received[n_before:]]
    assert max(second) < 7  # img2img starts mid-schedule
    assert core.session.switcher.merges == _runs(second) and first <= 8
    core.deactivate(p)
    assert _equal(sd, before)
    # an interrupted generation that never reached deactivate() is cleaned up by the next activate
    core.activate(p, [ExtraNetworkParams(["f8"])])
    _kdiffusion_pass(sd, core, wrap.get_sigmas(3))
    core.activate(p, [])
    assert core.session is None and _equal(sd, before)


def test_text_encoder_lora_merged_for_the_generation(tsm_dir):
    sd, core = _setup(tsm_dir)
    before = _state(sd)
    clip = sd.cond_stage_model.wrapped.transformer
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    te = core.session.text_encoder[0]
    name = next(iter(te.layers))
    assert _equal(sd, before)  # nothing merged until the text encoder runs
    with torch.no_grad():
        clip(torch.tensor([[0, 5, 7, 1]]))
    from tsm_trainer.export import lora_delta
    layer = te.layers[name]
    key = [k for k, v in clip.named_modules() if v is layer][0] + ".weight"
    torch.testing.assert_close(layer.weight, before["te." + key] + lora_delta(te.lora, name))
    core.deactivate()
    assert _equal(sd, before)


class FakeLora:
    """extensions-builtin/Lora/networks.py network_apply_weights / network_restore_weights_from_backup:
    lazy merge in each layer's forward, one backup per layer, re-merge when the wanted set changes."""

    def __init__(self):
        self.loaded_networks = []  # [(name, {layer: delta})]

    def network_apply_weights(self, layer):
        current = getattr(layer, "network_current_names", ())
        wanted = tuple(name for name, _ in self.loaded_networks)
        if getattr(layer, "network_weights_backup", None) is None:
            layer.network_weights_backup = layer.weight.to("cpu", copy=True)
        if current != wanted:
            with torch.no_grad():
                layer.weight.copy_(layer.network_weights_backup)
                for _, deltas in self.loaded_networks:
                    if layer in deltas:
                        layer.weight += deltas[layer]
            layer.network_current_names = wanted

    def patch(self, model):  # network_Linear_forward / network_Conv2d_forward call it first
        return [m.register_forward_pre_hook(lambda m, a: self.network_apply_weights(m))
                for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def test_coexists_with_ordinary_loras(tsm_dir):
    lora = FakeLora()
    sd, core = _setup(tsm_dir, prepare_layer=lora.network_apply_weights)
    unet = sd.model.diffusion_model
    base = _state(sd)
    handles = lora.patch(unet)
    # a LoRA on a layer TSM also targets, and one on a layer it doesn't (conv_in)
    shared_layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    g = torch.Generator().manual_seed(5)
    deltas = {shared_layer: torch.randn(shared_layer.weight.shape, generator=g) * 0.1,
              unet.conv_in: torch.randn(unet.conv_in.weight.shape, generator=g) * 0.1}
    lora.loaded_networks = [("other", deltas)]  # <lora:other:1> activated in the same prompt
    core.activate(Processing(), [ExtraNetworkParams(["f8", "1"])])
    _kdiffusion_pass(sd, core, CompVisDenoiser(sd).get_sigmas(8))
    core.deactivate()
    # the LoRA is still applied exactly as Lora believes (network_current_names), TSM is gone
    for layer, d in deltas.items():
        assert torch.equal(layer.network_weights_backup, base[[k for k, v in unet.named_modules() if v is layer][0] + ".weight"])
        assert torch.equal(layer.weight, (layer.network_weights_backup + d))
    others = {k for k in base if k.startswith("te.")} | {
        k for k in base if not any(k == n + ".weight" for n, m in unet.named_modules() if m in deltas)}
    now = _state(sd)
    assert all(torch.equal(now[k], base[k]) for k in others)
    # next generation without the LoRA: Lora restores its backup, which never held a TSM expert
    lora.loaded_networks = []
    with torch.no_grad():
        unet(*_inputs()[:1], torch.tensor([10]), _inputs()[1])
    assert _equal(sd, base)
    for h in handles:
        h.remove()


def test_card_page_lists_tsm_files_with_intervals(tsm_dir):
    found = find_tsm_files(str(tsm_dir))
    assert {"f8", "a81", "_part8", "_part1"} <= set(found) and "plain_lora" not in found
    from tsm_trainer.file_format import read_metadata
    text = tsm_a1111.card_description(read_metadata(found["f8"]))
    assert "TSM foster" in text and "scales 8" in text and "[0,125)" in text and "[875,1000)" in text
    assert "asymmetric mixture" in tsm_a1111.card_description(read_metadata(found["a81"]))
    item = tsm_a1111.card_item_fields("f8", read_metadata(found["f8"]), found["f8"], "opts.extra_networks_default_multiplier")
    assert item["prompt"] == '"<tsm:f8:" + opts.extra_networks_default_multiplier + ">"'


def test_flow_and_unknown_names(tsm_dir):
    assert float(timestep_from_sigma(torch.tensor([0.5]), None, "flow")[0]) == 500.0
    with pytest.raises(RuntimeError, match="1.6 or newer"):
        timestep_from_sigma(torch.tensor([1.0]), None, "ddpm")
    _, core = _setup(tsm_dir)
    with pytest.raises(ValueError, match="no TSM file named 'missing'"):
        core.activate(Processing(), [ExtraNetworkParams(["missing"])])


def test_open_clip_names_map_to_fused_in_proj_rows():
    """SD2 / SDXL-te2 OpenCLIP (ldm FrozenOpenCLIPEmbedder .model.transformer.resblocks[i].attn / .mlp):
    q/k/v are row blocks of attn.in_proj_weight, as Lora's convert_diffusers_name_to_compvis maps them."""
    from tsm_a1111.adapter import StaticTextEncoderLoRA, text_encoder_layer_index

    block = torch.nn.Module()
    block.attn = torch.nn.MultiheadAttention(8, 2)
    block.mlp = torch.nn.Module()
    block.mlp.c_fc, block.mlp.c_proj = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    model = types.SimpleNamespace(transformer=types.SimpleNamespace(resblocks=[block]))
    sd = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(wrapped=types.SimpleNamespace(model=model)))
    index = text_encoder_layer_index(sd)
    name = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    assert index["lora_te_text_model_encoder_layers_0_mlp_fc1"][0] is block.mlp.c_fc
    before = block.attn.in_proj_weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    tensors = {f"{name}.lora_down.weight": torch.randn(2, 8, generator=g),
               f"{name}.lora_up.weight": torch.randn(8, 2, generator=g), f"{name}.alpha": torch.tensor(2.0)}
    te = StaticTextEncoderLoRA(tensors, {n: v[0] for n, v in index.items()}, 1.0)
    te.apply()
    w = block.attn.in_proj_weight.detach()
    assert torch.equal(w[:8], before[:8]) and torch.equal(w[16:], before[16:])
    torch.testing.assert_close(w[8:16], before[8:16] + tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"])
    te.restore()
    assert torch.equal(block.attn.in_proj_weight.detach(), before)
