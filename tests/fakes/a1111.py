"""Stand-ins of the AUTOMATIC1111 webui objects the A1111 extension (extensions/sd-webui-tsm) touches.

Each keeps the real name and signature and cites the file whose behaviour it reproduces
(AUTOMATIC1111/stable-diffusion-webui v1.8.0, crowsonkb/k-diffusion):

- ``modules/extra_networks.py``: ExtraNetworkParams, parse_prompt
- ``modules/script_callbacks.py``: CFGDenoiserParams
- k-diffusion ``sampling.py`` / ``external.py``: append_zero, get_sigmas_karras, DiscreteSchedule,
  CompVisDenoiser; ``modules/sd_samplers_timesteps.py``: CompVisTimestepsDenoiser, ddim_timesteps
  (CompVisSampler.get_timesteps); ``modules/sd_samplers_cfg_denoiser.py``: CFGDenoiser; ldm's
  scaled-linear schedule: alphas_cumprod_sd
- ``shared.sd_model`` (ldm LatentDiffusion layout): SDModel, TextEncoder; ``modules/processing.py``: Processing
- the built-in Lora extension (``extensions-builtin/Lora``): ``network.py`` Network, NetworkModule,
  NetworkWeights; ``networks.py`` as FakeLora (layer names, lazy merge in each patched forward)

Stand-ins prove nothing about the real webui: they only let CI run offline. tests/test_ext_a1111_real.py
runs the same paths inside the real webui.
"""

from __future__ import annotations

import re
import sys
import types
from collections import defaultdict, namedtuple
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extensions" / "sd-webui-tsm"))
from tsm_a1111 import LoraHost


class ExtraNetworkParams:
    """modules/extra_networks.py ExtraNetworkParams (verbatim logic)."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
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

    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
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
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())
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
        c_in = 1 / (sigma**2 + 1) ** 0.5
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
        self.swallowed = []

    def __call__(self, x, sigma, cond, uncond):
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        params = CFGDenoiserParams(x_in, None, sigma_in, self.step, None, cond, uncond, self)
        for cb in self.callbacks:  # script_callbacks.cfg_denoiser_callback: exceptions printed, then ignored
            try:
                cb(params)
            except Exception as e:
                self.swallowed.append(e)
        out = self.inner_model(params.x, params.sigma, cond=torch.cat([params.text_cond, params.text_uncond]))
        self.step += 1
        return out


def alphas_cumprod_sd():
    """ldm make_beta_schedule("linear", 1000, 0.00085, 0.012): SD's scaled-linear schedule (float32 buffer)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def ddim_timesteps(steps):
    """modules/sd_samplers_timesteps.py CompVisSampler.get_timesteps; the samplers walk it backwards."""
    timesteps = torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)
    return timesteps.flip(0)


class TextEncoder(torch.nn.Module):
    """sd_model.cond_stage_model: ``.wrapped.transformer`` is the CLIP text model."""

    def __init__(self, clip):
        super().__init__()
        self.wrapped = torch.nn.Module()
        self.wrapped.transformer = clip

    def forward(self, ids):
        return self.wrapped.transformer(ids).last_hidden_state


class SDModel:
    """shared.sd_model, the parts the adapter and samplers touch (ldm LatentDiffusion layout)."""

    def __init__(self, unet, clip=None):
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet
        self.cond_stage_model = TextEncoder(clip)
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


# -- the built-in Lora extension (extensions-builtin/Lora), as TSM uses it -------------------------
NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])  # network.py


class Network:
    """network.py Network: the fields Lora's merge key reads."""

    def __init__(self, name, network_on_disk):
        self.name, self.network_on_disk = name, network_on_disk
        self.te_multiplier = self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}


class NetworkModule:
    """network.py NetworkModule: multiplier() is te_multiplier when ``transformer`` is in the first 20
    characters of the layer name, else unet_multiplier; finalize_updown reshapes a 4-d output shape
    and a same-size delta to the weight's shape, then scales by multiplier() (scale/alpha unset: 1)."""

    def __init__(self, net, weights):
        self.network, self.network_key, self.sd_key, self.sd_module = (
            net,
            weights.network_key,
            weights.sd_key,
            weights.sd_module,
        )

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        return updown * self.multiplier(), ex_bias


class FakeLora:
    """networks.py: names layers on model load, and merges lazily in each patched forward
    (network_apply_weights): the first time any network is wanted it copies the weight to the CPU
    as its backup; whenever the key ``(name, te_multiplier, unet_multiplier, dyn_dim)`` of the loaded
    networks differs from the layer's, it copies the backup back and adds every loaded network's
    ``calc_updown`` (a MultiheadAttention needs modules ``_q_proj``, ``_k_proj``, ``_v_proj``, ``_out_proj``;
    q/k/v stacked onto ``in_proj_weight``). A RuntimeError there is only counted."""

    def __init__(self):
        self.loaded_networks = []
        self.errors = {}
        self.network = types.SimpleNamespace(
            Network=Network, NetworkModule=NetworkModule, NetworkWeights=NetworkWeights
        )
        self.host = LoraHost(self.network, self)
        self._handles = []

    def assign_names(self, sd):  # assign_network_names_to_compvis_modules (SD1/SD2)
        for name, m in sd.cond_stage_model.wrapped.named_modules():
            m.network_layer_name = name.replace(".", "_")
        for name, m in sd.model.named_modules():
            m.network_layer_name = name.replace(".", "_")
        self._handles += [
            m.register_forward_pre_hook(lambda m, a: self.network_apply_weights(m))
            for m in [*sd.model.modules(), *sd.cond_stage_model.modules()]
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention))
        ]

    def network_apply_weights(self, layer):
        name = getattr(layer, "network_layer_name", None)
        if name is None:
            return
        mha = isinstance(layer, torch.nn.MultiheadAttention)
        params = (layer.in_proj_weight, layer.out_proj.weight) if mha else (layer.weight,)
        wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in self.loaded_networks)
        if getattr(layer, "network_weights_backup", None) is None and wanted:
            layer.network_weights_backup = tuple(p.to("cpu", copy=True) for p in params)
        if getattr(layer, "network_current_names", ()) == wanted:
            return
        with torch.no_grad():
            for p, b in zip(params, getattr(layer, "network_weights_backup", None) or ()):
                p.copy_(b)
            for net in self.loaded_networks:
                try:
                    if name in net.modules:
                        params[0].add_(net.modules[name].calc_updown(params[0])[0])
                    elif mha and name + "_q_proj" in net.modules:
                        parts = [
                            net.modules[name + s].calc_updown(params[0])[0] for s in ("_q_proj", "_k_proj", "_v_proj")
                        ]
                        params[0].add_(torch.vstack(parts))
                        params[1].add_(net.modules[name + "_out_proj"].calc_updown(params[1])[0])
                except RuntimeError:
                    self.errors[net.name] = self.errors.get(net.name, 0) + 1
        layer.network_current_names = wanted

    def remove(self):
        for h in self._handles:
            h.remove()
