"""Stand-ins of the stable-diffusion-webui-forge objects the Forge extension (extensions/sd-forge-tsm)
touches, with the real names and call conventions (lllyasviel/stable-diffusion-webui-forge, commit
dfdcbab); the file is cited at each class:

- ``backend/modules/k_prediction.py``: Prediction; ``backend/modules/k_model.py``: KModel
- ``backend/patcher/unet.py`` / ``base.py``: UnetPatcher; ``backend/sampling/sampling_function.py``: denoise
  (calc_cond_uncond_batch); k-diffusion: karras_sigmas
- ``backend/operations.py``: ForgeLinear (ForgeOperations.Linear), QuantLinear (the BNB-4bit / GGUF
  Linears: weights that are not a float tensor); ``backend/nn/unet.py``: forge_unet (the
  IntegratedUNet2DConditionModel call), DiffusersCall, dequantized_copy
- ``backend/patcher/clip.py``: CLIP, CLIPHolder (JointTextEncoder layout);
  ``packages_3rdparty/comfyui_lora_collection/lora.py``: model_lora_keys_clip, load_lora;
  ``backend/diffusion_engine/base.py``: ForgeObjects; ``modules/extra_networks.py``: ExtraNetworkParams

Stand-ins prove nothing about the real Forge: they only let CI run offline. tests/test_ext_forge_real.py
runs the extension against Forge's real modules.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tests.tiny_models import tiny_clip, tiny_unet
from tsm_trainer.runtime.discrete_sigmas import DiscreteSigmas


class Prediction(DiscreteSigmas):
    """backend/modules/k_prediction.py ``Prediction`` (ComfyUI's ModelSamplingDiscrete): SD's scaled-linear
    betas (make_beta_schedule "linear": linspace of sqrt, squared, float64), sigmas from alphas_cumprod,
    ``timestep(sigma)`` = nearest index in log-sigma."""

    def calculate_input(self, sigma, noise):  # AbstractPrediction, sigma_data = 1
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):  # eps prediction
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma


class KModel(nn.Module):
    """backend/modules/k_model.py ``KModel``: ``apply_model(x, t=sigma, c_crossattn=...)`` hands the UNet
    ``predictor.timestep(sigma).float()``."""

    def __init__(self, diffusion_model, storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = Prediction()
        self.storage_dtype = storage_dtype
        self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x).to(self.computation_dtype)
        t = self.predictor.timestep(t).float()
        context = c_crossattn.to(self.computation_dtype)
        out = self.diffusion_model(xc, t, context=context, control=control, transformer_options=transformer_options)
        return self.predictor.calculate_denoised(sigma, out.float(), x)


class UnetPatcher:
    """backend/patcher/unet.py ``UnetPatcher.clone`` (deep-copies model_options, shares the model) and
    backend/patcher/base.py ``ModelPatcher.set_model_unet_function_wrapper`` / ``model_patches_to``."""

    def __init__(self, model, load_device=torch.device("cpu")):
        self.model = model
        self.load_device = load_device
        self.offload_device = torch.device("cpu")
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = UnetPatcher(self.model, self.load_device)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def model_patches_to(self, device):
        if "model_function_wrapper" in self.model_options:
            wrap_func = self.model_options["model_function_wrapper"]
            if hasattr(wrap_func, "to"):
                self.model_options["model_function_wrapper"] = wrap_func.to(device)


def denoise(unet_patcher, x, sigma, cond, uncond):
    """backend/sampling/sampling_function.py ``calc_cond_uncond_batch``: cond and uncond in one batch,
    ``timestep_ = torch.cat([timestep] * batch_chunks)`` (sigmas), then the wrapper call convention."""
    model, model_options = unet_patcher.model, unet_patcher.model_options
    input_x = torch.cat([x, x])
    timestep_ = torch.cat([sigma] * 2)
    c = {"c_crossattn": torch.cat([cond, uncond])}
    cond_or_uncond = [0, 1]
    if "model_function_wrapper" in model_options:
        output = model_options["model_function_wrapper"](
            model.apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}
        )
    else:
        output = model.apply_model(input_x, timestep_, **c)
    return output.chunk(2)


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """k_diffusion.sampling.get_sigmas_karras (Forge's default schedule for most samplers)."""
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv + ramp * (min_inv - max_inv)) ** rho, torch.zeros(1)])


class ForgeLinear(nn.Module):
    """backend/operations.py ``ForgeOperations.Linear``: a plain nn.Module (not nn.Linear)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.parameters_manual_cast = False

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


ForgeLinear.__name__ = "Linear"  # as Forge's class is named


class QuantLinear(nn.Module):
    """Stands for backend/operations.py ``ForgeOperationsBNB4bits.Linear`` / ``ForgeOperationsGGUF.Linear``:
    a class named Linear, no in_features, a non-float weight marked ``bnb_quantized`` and dequantised in
    forward. (Here: int8 codes times a per-row scale.)"""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.weight.bnb_quantized = True
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self):
        return self.weight.float() * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantized(), self.bias)


QuantLinear.__name__ = "Linear"


def forge_unet(linear_cls=ForgeLinear, seed=0):
    """A tiny SD-shaped UNet in Forge's form: every nn.Linear replaced by a Forge-style Linear, called as
    backend/nn/unet.py
    ``IntegratedUNet2DConditionModel.forward(x, timesteps, context, control, transformer_options)``."""
    unet = tiny_unet(seed=seed)
    for _path, module in list(unet.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, linear_cls(child))
    unet.__class__ = _ForgeCallUNet
    return unet


class _ForgeCallUNet(type(tiny_unet())):
    def forward(self, x, timesteps=None, context=None, control=None, transformer_options={}, **kwargs):
        return super().forward(x, timesteps, context).sample


class DiffusersCall(nn.Module):
    """A plain diffusers UNet (with a TSMNetwork attached) called the way KModel calls Forge's UNet."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps=None, context=None, **kwargs):
        return self.unet(x, timesteps, context).sample


def dequantized_copy(qunet):
    """The float model holding exactly the quantized model's dequantized weights."""
    unet = forge_unet()
    qmods = dict(qunet.named_modules())
    with torch.no_grad():
        for path, m in unet.named_modules():
            q = qmods[path]
            if isinstance(m, ForgeLinear):
                m.weight.copy_(q.dequantized())
                if m.bias is not None:
                    m.bias.copy_(q.bias)
            elif not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
                for (_, a), (_, b) in zip(m.named_parameters(recurse=False), q.named_parameters(recurse=False)):
                    a.copy_(b)
    return unet


class CLIPHolder(nn.Module):
    """Forge's ``JointTextEncoder`` layout (backend/patcher/clip.py): ``clip_l.transformer`` is the CLIP."""

    def __init__(self):
        super().__init__()
        self.clip_l = nn.Module()
        self.clip_l.transformer = nn.Module()
        # Forge's keys are clip_l.transformer.text_model.encoder... (this transformers flattens text_model)
        self.clip_l.transformer.text_model = tiny_clip()


# -- text encoder and the processing lifecycle ------------------------------------------------------
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def model_lora_keys_clip(model, key_map=None):
    """packages_3rdparty/comfyui_lora_collection/lora.py ``model_lora_keys_clip`` (the clip_l / SD1 part),
    as backend/patcher/lora.py returns it: ``{kohya name: model key}``."""
    key_map = {} if key_map is None else key_map
    sdk = model.state_dict().keys()
    for b in range(32):
        for c, short in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{short}"] = k
    return key_map


def load_lora(lora, to_load):
    """packages_3rdparty/comfyui_lora_collection/lora.py ``load_lora``, regular kohya branch."""
    patch_dict, loaded = {}, set()
    for x in to_load:
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        loaded.add(f"{x}.alpha")
        if f"{x}.lora_up.weight" in lora:
            patch_dict[to_load[x]] = (
                "lora",
                (lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"], alpha, None, None),
            )
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


class CLIP:
    """backend/patcher/clip.py ``CLIP``: clone() shares cond_stage_model; add_patches goes to
    ModelPatcher.add_patches(*, filename, patches, strength_patch, strength_model, online_mode)."""

    def __init__(self, cond_stage_model):
        self.cond_stage_model = cond_stage_model
        self.lora_patches = {}

    def clone(self):
        n = CLIP(self.cond_stage_model)
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = patches
        return set(patches)


class ForgeObjects:
    """backend/diffusion_engine/base.py ``ForgeObjects.shallow_copy``."""

    def __init__(self, unet, clip):
        self.unet, self.clip = unet, clip

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip)


class ExtraNetworkParams:  # modules/extra_networks.py
    def __init__(self, items):
        self.items = items
