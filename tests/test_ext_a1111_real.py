"""sd-webui-tsm inside the REAL AUTOMATIC1111 webui: its extra_networks, script_callbacks, CFG
denoisers, samplers (k-diffusion, Restart, DDIM), prompt parser and built-in Lora extension, with a
tiny random-init SD1 model in the ldm layout (real ``ldm.modules.diffusionmodules.openaimodel.UNetModel``).

Skipped unless ``TSM_A1111_DIR`` points at a webui checkout whose ``repositories/`` holds
stable-diffusion-stability-ai, generative-models and k-diffusion. Run it on its own, in a venv
with the webui's module dependencies (see tests/a1111_real.py):
``TSM_A1111_DIR=/path/to/webui python -m pytest tests/test_ext_a1111_real.py -q``
"""

from __future__ import annotations

import os
import types

import pytest
import torch

A1111_DIR = os.environ.get("TSM_A1111_DIR")
pytestmark = pytest.mark.skipif(not A1111_DIR, reason="TSM_A1111_DIR does not point at an A1111 webui checkout")

STEPS = 12


# -- files and model ------------------------------------------------------------------------------
def _unet_diffusers():
    from tests.tiny_models import tiny_unet

    # SD1's block layout (2 layers per block: the kohya <-> ldm name map assumes it); 32 channels per
    # block because ldm's GroupNorm has 32 groups
    return tiny_unet(block_out_channels=(32, 64), norm_num_groups=32, layers_per_block=2)


def _write_files(folder):
    """Fostered [8] with a text-encoder LoRA, the same for one interval, and an assembled [8, 1]."""
    import networks.tsm_lora as tsm_lora  # the repo's module: imported before the webui's `networks`
    from tests.tiny_models import randomise, tiny_clip
    from tsm_trainer import TSMConfig, TSMNetwork

    net = TSMNetwork(TSMConfig(scales=[8], rank=2, alpha=1.0, conv_rank=2), _unet_diffusers(), [tiny_clip()])
    randomise(net, 0, std=0.05)
    net.save(str(folder / "f8.safetensors"))
    one = TSMNetwork(TSMConfig(scales=[8], interval=5, rank=2, alpha=1.0), _unet_diffusers(), [])
    randomise(one, 1, std=0.05)
    one.save(str(folder / "only5.safetensors"))
    parts = []
    for scales, seed in (("8", 1), ("1", 2)):
        part = tsm_lora.create_network(1.0, 2, 2, None, None, _unet_diffusers(), tsm_scales=scales)
        randomise(part, seed, std=0.05)
        parts.append(str(folder / f"_part{scales}.safetensors"))
        part.save_weights(parts[-1], None, None)
    assembled = tsm_lora.create_network(
        1.0, 2, 2, None, None, _unet_diffusers(), tsm_scales="8,1", tsm_stage="assemble", tsm_experts=",".join(parts)
    )
    with torch.no_grad():
        for lora in assembled.denoiser_loras:
            lora.router.embedding.normal_(0, 0.5)
    assembled.save_weights(str(folder / "a81.safetensors"), None, None)


class TextEncoder(torch.nn.Module):
    """``cond_stage_model`` (``.wrapped.transformer`` is the CLIP text model, as in
    ``FrozenCLIPEmbedderWithCustomWords``); a fixed toy tokenizer."""

    def __init__(self):
        super().__init__()
        from tests.tiny_models import tiny_clip

        self.wrapped = torch.nn.Module()
        self.wrapped.transformer = tiny_clip()

    def forward(self, texts):
        ids = [[0] + [2 + ord(c) % 90 for c in str(t)[:6]] for t in texts]
        ids = torch.tensor([row + [1] * (8 - len(row)) for row in ids])
        return self.wrapped.transformer(ids).last_hidden_state


def make_model(a, seed=0):
    """The parts of ldm's ``LatentDiffusion`` that A1111's samplers, prompt parser and Lora read."""
    torch.manual_seed(seed)
    sd = torch.nn.Module()
    sd.model = torch.nn.Module()
    sd.model.conditioning_key = "crossattn"
    sd.model.diffusion_model = a.openaimodel.UNetModel(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[1],
        num_res_blocks=2,
        channel_mult=[1, 2],
        num_heads=2,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=16,
        use_checkpoint=False,
        legacy=False,
    ).eval()
    with torch.no_grad():
        for p in sd.model.diffusion_model.parameters():  # ldm zero-inits output layers; make every layer count
            p.add_(torch.randn_like(p) * 0.02)
    sd.cond_stage_model = TextEncoder()
    sd.requires_grad_(False)  # as loaded by sd_models (frozen ldm modules)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    sd.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
    sd.parameterization, sd.cond_stage_key, sd.is_sdxl, sd.is_sd2, sd.is_sd1 = "eps", "txt", False, False, True
    sd.sd_checkpoint_info = None
    sd.get_learned_conditioning = lambda texts: sd.cond_stage_model(texts)

    def apply_model(x, t, cond):  # ldm DDPM.apply_model -> DiffusionWrapper (crossattn)
        return sd.model.diffusion_model(x, t, context=torch.cat(cond["c_crossattn"], 1))

    sd.apply_model = apply_model
    a.shared.sd_model = sd
    a.script_callbacks.model_loaded_callback(sd)  # Lora names the layers (assign_network_names_to_compvis_modules)
    return sd


@pytest.fixture(scope="module")
def a(tmp_path_factory):
    folder = tmp_path_factory.mktemp("TSM")
    _write_files(folder)
    from tests import a1111_real

    env = a1111_real.load(A1111_DIR)
    env.shared.cmd_opts.tsm_dir = str(folder)
    env.folder = folder
    return env


class P:
    """``StableDiffusionProcessing``: what extra networks and the CFG denoiser read or write."""

    def __init__(self, prompt):
        self.prompt = prompt
        self.all_prompts = [prompt]
        self.extra_generation_params = {}
        self.comments = {}
        self.scripts = None
        self.refiner_switch_at = None
        self.refiner_checkpoint_info = None

    def comment(self, text):
        self.comments[text] = 1


def activate(a, sd, prompt):
    a.shared.sd_model = sd
    p = P(prompt)
    _, data = a.extra_networks.parse_prompts([prompt])
    with torch.no_grad():
        a.extra_networks.activate(p, data)
    p.data = data
    return p


def deactivate(a, p):
    with torch.no_grad():
        a.extra_networks.deactivate(p, p.data)


def sample(a, sd, sampler="euler", steps=STEPS, prompt="a cat"):
    """One sampling pass through A1111's real CFG denoiser and a real sampler."""
    with torch.no_grad():  # processing.process_images_inner runs under no_grad
        return _sample(a, sd, sampler, steps, prompt)


def _sample(a, sd, sampler, steps, prompt):
    pp = a.prompt_parser
    conds = pp.get_multicond_learned_conditioning(sd, [prompt], steps)
    uncond = pp.get_learned_conditioning(sd, [""], steps)
    timesteps = sampler == "ddim"
    module = a.sd_samplers_timesteps if timesteps else a.sd_samplers_kdiffusion
    cls = module.CFGDenoiserTimesteps if timesteps else module.CFGDenoiserKDiffusion
    denoiser = cls(types.SimpleNamespace(sampler_extra_args={}))
    denoiser.p, denoiser.steps, denoiser.total_steps = P(prompt), steps, steps
    extra = dict(cond=conds, uncond=uncond, cond_scale=7.0, s_min_uncond=0.0, image_cond=torch.zeros(1, 5, 1, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    if timesteps:
        ts = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)  # CompVisSampler.get_timesteps
        return a.sd_samplers_timesteps_impl.ddim(denoiser, x, ts, extra_args=extra, disable=True)
    sigmas = denoiser.inner_model.get_sigmas(steps)
    x = x * sigmas[0]
    if sampler == "restart":
        return a.sd_samplers_extra.restart_sampler(denoiser, x, sigmas, extra_args=extra, disable=True)
    if sampler == "dpm_adaptive":
        return a.k_sampling.sample_dpm_adaptive(denoiser, x, sigmas[-2], sigmas[0], extra_args=extra, disable=True)
    return getattr(a.k_sampling, f"sample_{sampler}")(denoiser, x, sigmas, extra_args=extra, disable=True)


def weights(sd):
    return {k: v.detach().clone() for k, v in sd.state_dict().items() if k != "alphas_cumprod"}


def changed(sd, before):
    now = sd.state_dict()
    return [k for k, v in before.items() if not torch.equal(now[k], v)]


def expert_delta(path, kohya, e, n=8):
    from safetensors.torch import load_file

    t = load_file(str(path))
    pre = f"{kohya}.tsm.{n}.{e}"
    down, up = t[f"{pre}.lora_down.weight"].float(), t[f"{pre}.lora_up.weight"].float()
    return (up.flatten(1) @ down.flatten(1)).reshape(-1, *down.shape[1:]) * (float(t[f"{kohya}.alpha"]) / down.shape[0])


class Watch:
    """At each forward of one layer: the t the UNet received and the layer's weight as it ran."""

    def __init__(self, sd, layer):
        self.t, self.seen = None, []
        self.h = [
            sd.model.diffusion_model.register_forward_pre_hook(self._unet),
            layer.register_forward_hook(self._layer),
        ]

    def _unet(self, module, args):
        self.t = float(torch.as_tensor(args[1]).reshape(-1)[0])

    def _layer(self, module, args, out):
        self.seen.append((self.t, module.weight.detach().clone(), getattr(module, "network_current_names", ())))

    def remove(self):
        for h in self.h:
            h.remove()


LAYER = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
WKEY = "model.diffusion_model." + LAYER + ".weight"
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _layer(sd):
    return sd.model.diffusion_model.get_submodule(LAYER)


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sampler,steps",
    [("euler", STEPS), ("dpmpp_2m", STEPS), ("heun", STEPS), ("restart", 30), ("dpm_adaptive", STEPS), ("ddim", STEPS)],
)
def test_expert_of_each_call_merged_by_lora_then_restored(a, sampler, steps):
    from tsm_trainer.core.intervals import expert_index

    sd = make_model(a)
    base = weights(sd)
    layer = _layer(sd)
    p = activate(a, sd, "a cat <tsm:f8:0.7>")
    assert p.extra_generation_params["TSM"] == "f8: 0.7"
    watch = Watch(sd, layer)
    sample(a, sd, sampler, steps)
    watch.remove()
    assert len(watch.seen) >= steps
    merges = crossings = 0
    for i, (t, w, key) in enumerate(watch.seen):
        crossings += i == 0 or expert_index(t, 8) != expert_index(watch.seen[i - 1][0], 8)
        e = expert_index(t, 8)
        torch.testing.assert_close(
            w, base[WKEY] + 0.7 * expert_delta(a.folder / "f8.safetensors", KOHYA, e), rtol=1e-5, atol=1e-6
        )
        merges += i == 0 or key != watch.seen[i - 1][2]
    print(f"{sampler} at {steps} steps: {len(watch.seen)} UNet calls, {merges} merges")
    assert merges == crossings  # one re-merge per boundary crossed (more than 8 when t goes back up)
    deactivate(a, p)
    assert changed(sd, base) == []  # every layer back to the base weights right after the generation


def test_checkpoint_cache_switch_never_corrupts_the_cached_model(a):
    """Refiner/hires checkpoint with "Maximum number of checkpoints loaded" >= 2: model_loaded fires for
    the other model in the middle of a generation; the cached one must come back exact."""
    base_model, other = make_model(a, 0), make_model(a, 1)
    base = weights(base_model)
    p = activate(a, base_model, "<tsm:f8:1>")
    sample(a, base_model, steps=4)
    a.shared.sd_model = other
    a.script_callbacks.model_loaded_callback(other)  # sd_models.reload_model_weights -> model_loaded
    p2 = activate(a, other, "<tsm:f8:1>")  # the hires pass on the other checkpoint
    sample(a, other, steps=4)
    deactivate(a, p2)
    deactivate(a, p)
    assert changed(base_model, base) == []
    a.shared.sd_model = base_model  # back to the cached model, no <tsm>
    p3 = activate(a, base_model, "a cat")
    sample(a, base_model, steps=2)
    deactivate(a, p3)
    assert changed(base_model, base) == []
    p4 = activate(a, base_model, "<tsm:f8:1>")  # and the next session's "base" is the base
    sample(a, base_model, steps=2)
    deactivate(a, p4)
    assert changed(base_model, base) == []


def test_controlnet_style_forward_and_two_files_leave_nothing_behind(a):
    """ControlNet replaces UNetModel.forward with (*args, **kwargs) before extra networks activate."""
    sd = make_model(a)
    unet = sd.model.diffusion_model
    original = unet.forward
    unet.forward = lambda *args, **kwargs: original(*args, **kwargs)
    base = weights(sd)
    p = activate(a, sd, "<tsm:a81:1> <tsm:f8:0.5>")
    assert p.extra_generation_params["TSM"] == "a81: 1, f8: 0.5"
    assert a.tsm_script.network.session is not None and len(a.tsm_script.network.session.online) == 1
    with_tsm = sample(a, sd, steps=4)
    deactivate(a, p)
    assert changed(sd, base) == []
    assert all("forward" not in vars(m) for m in unet.modules() if m is not unet)
    without = sample(a, sd, steps=4)  # no "called with no timestep set": nothing is left wrapped
    assert not torch.allclose(with_tsm, without)


def test_errors_during_sampling_stop_the_generation(a):
    sd = make_model(a)
    base = weights(sd)
    # a one-interval file sampled over the whole schedule: A1111 swallows the callback's exception,
    # the next layer forward raises it
    p = activate(a, sd, "<tsm:only5:1>")
    with pytest.raises(Exception, match="needs expert 7 of scale 8.*holds \\[5\\]"):
        sample(a, sd, steps=4)
    deactivate(a, p)
    assert changed(sd, base) == []
    # a missing file: A1111 prints activate's exception and calls activate(p, []) -- still stops
    p = activate(a, sd, "<tsm:nope:1>")
    with pytest.raises(Exception, match="no TSM file named 'nope'"):
        sample(a, sd, steps=2)
    deactivate(a, p)
    sample(a, sd, steps=2)  # the next generation runs


def test_loractl_style_per_step_lora_weights_keep_the_expert(a):
    """loractl sets a Lora network's te/unet multipliers at every step; Lora re-merges from its backup."""
    from safetensors.torch import save_file

    from tsm_trainer.core.intervals import expert_index

    sd = make_model(a)
    layer = _layer(sd)
    g = torch.Generator().manual_seed(3)
    save_file(
        {
            f"{KOHYA}.lora_down.weight": torch.randn(2, 32, generator=g) * 0.1,
            f"{KOHYA}.lora_up.weight": torch.randn(32, 2, generator=g) * 0.1,
            f"{KOHYA}.alpha": torch.tensor(2.0),
        },
        os.path.join(a.lora_dir, "plain.safetensors"),
    )
    a.networks.list_available_networks()
    base = weights(sd)
    p = activate(a, sd, "<lora:plain:1> <tsm:f8:1>")
    plain = next(n for n in a.networks.loaded_networks if n.name == "plain")

    step = [0]

    def per_step(params):  # what loractl does from its own on_cfg_denoiser, once per denoiser call
        plain.te_multiplier = plain.unet_multiplier = 1.0 - step[0] / STEPS
        step[0] += 1

    a.script_callbacks.on_cfg_denoiser(per_step)
    watch = Watch(sd, layer)
    try:
        sample(a, sd, steps=6)
    finally:
        a.script_callbacks.remove_current_script_callbacks()
        watch.remove()
    from safetensors.torch import load_file

    t = load_file(os.path.join(a.lora_dir, "plain.safetensors"))
    lora_delta = t[f"{KOHYA}.lora_up.weight"] @ t[f"{KOHYA}.lora_down.weight"]
    assert len({key for _, _, key in watch.seen}) == 6  # Lora re-merged at every step
    for t_unet, w, key in watch.seen:
        mult = next(k[2] for k in key if k[0] == "plain")
        expected = (
            base[WKEY] + mult * lora_delta + expert_delta(a.folder / "f8.safetensors", KOHYA, expert_index(t_unet, 8))
        )
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    deactivate(a, p)


class OpenCLIPTextEncoder(torch.nn.Module):
    """SD2's ``cond_stage_model`` (``FrozenOpenCLIPEmbedder``: ``.wrapped.model.transformer`` is open_clip's
    ``Transformer``, whose attention is a ``MultiheadAttention`` with fused q/k/v in ``in_proj_weight``)."""

    def __init__(self):
        super().__init__()
        import open_clip.transformer

        torch.manual_seed(0)
        self.wrapped = torch.nn.Module()
        self.wrapped.model = torch.nn.Module()
        self.wrapped.model.transformer = open_clip.transformer.Transformer(width=16, layers=2, heads=2, mlp_ratio=2.0)
        self.embed = torch.nn.Embedding(100, 16)

    def forward(self, texts):
        ids = torch.tensor([[2 + ord(c) % 90 for c in str(t)[:6].ljust(6)] for t in texts])
        x = self.embed(ids)
        batch_first = getattr(self.wrapped.model.transformer, "batch_first", False)
        x = self.wrapped.model.transformer(x if batch_first else x.transpose(0, 1))
        return x if batch_first else x.transpose(0, 1)


def test_open_clip_text_encoder_lora_survives_a_device_move(a):
    """medvram/lowvram move the text encoder between devices after extra networks activate:
    ``module.to()`` replaces every ``param.data``. OpenCLIP's q/k/v LoRA must be in the weights the
    text encoder runs with (before: written through a view taken at activate, and lost)."""
    sd = make_model(a)
    sd.cond_stage_model = OpenCLIPTextEncoder().requires_grad_(False)
    a.shared.sd_model = sd
    a.script_callbacks.model_loaded_callback(sd)
    attn = sd.cond_stage_model.wrapped.model.transformer.resblocks[0].attn
    base = attn.in_proj_weight.detach().clone()
    p = activate(a, sd, "<tsm:f8:1>")
    for param in sd.cond_stage_model.parameters():  # lowvram's module.to(device), on one device
        param.data = param.data.clone()
    seen = []
    h = attn.register_forward_hook(lambda m, args, out: seen.append(m.in_proj_weight.detach().clone()))
    with torch.no_grad():
        sd.cond_stage_model(["a cat"])
    h.remove()
    from safetensors.torch import load_file

    t = load_file(str(a.folder / "f8.safetensors"))
    expected = base.clone()
    for j, part in enumerate("qkv"):
        k = f"lora_te_text_model_encoder_layers_0_self_attn_{part}_proj"
        if f"{k}.lora_up.weight" in t:
            expected[16 * j : 16 * (j + 1)] += (
                t[f"{k}.lora_up.weight"] @ t[f"{k}.lora_down.weight"] * (float(t[f"{k}.alpha"]) / 2)
            )
    assert not torch.equal(expected, base)
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-6)
    deactivate(a, p)
    assert torch.equal(attn.in_proj_weight, base)


def test_card_page_search_terms_for_the_1_8_page(a):
    page = next(pg for pg in a.ui_extra_networks.extra_pages if pg.name == "tsm")
    page.refresh()
    item = page.create_item("f8", 0)
    assert item["search_terms"] and item["search_terms"][0].endswith("f8.safetensors")
