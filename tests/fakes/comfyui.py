"""Stand-ins of the ComfyUI modules the node `Load TSM LoRA` (extensions/comfyui-tsm) touches.

They reimplement only what the adapter and a sampling run touch, with ComfyUI's names and
signatures (comfyanonymous/ComfyUI):

- ``folder_paths.py``: get_filename_list, get_full_path, get_full_path_or_raise
- ``comfy/patcher_extension.py``: CallbacksMP, WrappersMP, WrapperExecutor, get_all_wrappers,
  copy_nested_dicts (verbatim semantics)
- ``comfy/model_patcher.py``: ModelPatcher.clone / add_patches / add_wrapper_with_key / get_wrappers /
  add_callback_with_key / get_all_callbacks / pre_run / cleanup (fires ON_CLEANUP)
- ``comfy/model_base.py``: BaseModel.apply_model (runs the APPLY_MODEL wrappers with class_obj=self
  around _apply_model, which computes ``t = self.model_sampling.timestep(sigma).float()``)
- ``comfy/model_sampling.py`` ModelSamplingDiscrete + EPS, with
  ``comfy/ldm/modules/diffusionmodules/util.py`` make_beta_schedule("linear") (scaled-linear betas)
- ``comfy/samplers.py``: CFGGuider.outer_sample (pre_run, sampling, ``finally: cleanup()``),
  calc_cond_batch (cond and uncond in one apply_model call), karras/simple schedulers;
  ``comfy/sampler_helpers.py`` prepare_model_patcher (patcher wrappers/callbacks -> transformer_options);
  ``comfy/k_diffusion/sampling.py`` get_sigmas_karras, sample_euler
- ``comfy/lora.py``: load_lora, model_lora_keys_clip (CLIP-L part), calculate_weight ("lora" patches);
  ``comfy/sd.py``: CLIP.clone / add_patches; ``comfy/sd1_clip.py``: SD1ClipModel.clip_l.transformer

``comfy_modules`` builds ``folder_paths`` and the ``comfy.*`` modules the extension imports from them.

Stand-ins prove nothing about the real ComfyUI: they only let CI run offline.
tests/test_ext_comfyui_real.py loads the node into ComfyUI's real modules.
"""

from __future__ import annotations

import copy
import os
import types

import torch

from tsm_trainer.runtime.discrete_sigmas import DiscreteSigmas


class CallbacksMP:  # comfy/patcher_extension.py
    ON_CLONE = "on_clone"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"


class WrappersMP:  # comfy/patcher_extension.py
    OUTER_SAMPLE = "outer_sample"
    SAMPLER_SAMPLE = "sampler_sample"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"


def get_all_wrappers(wrapper_type, transformer_options, is_model_options=False):  # comfy/patcher_extension.py
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    w_list = []
    for w in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        w_list.extend(w)
    return w_list


class WrapperExecutor:  # comfy/patcher_extension.py
    def __init__(self, original, class_obj, wrappers, idx):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers.copy(), idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    @classmethod
    def new_class_executor(cls, original, class_obj, wrappers, idx=0):
        return cls(original, class_obj, wrappers, idx)


def copy_nested_dicts(input_dict):  # comfy/patcher_extension.py
    new_dict = input_dict.copy()
    for key, value in input_dict.items():
        if isinstance(value, dict):
            new_dict[key] = copy_nested_dicts(value)
        elif isinstance(value, list):
            new_dict[key] = value.copy()
    return new_dict


class EPS:  # comfy/model_sampling.py
    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma


class ModelSamplingDiscrete(DiscreteSigmas):  # comfy/model_sampling.py
    def __init__(self, model_config=None):
        super().__init__(0.00085, 0.012, 1000)
        self.sigma_data = 1.0


class ModelSampling(ModelSamplingDiscrete, EPS):  # comfy/model_base.py model_sampling(): class ModelSampling(s, c)
    pass


class BaseModel(torch.nn.Module):  # comfy/model_base.py
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSampling()
        self.device = torch.device("cpu")

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return WrapperExecutor.new_class_executor(
            self._apply_model, self, get_all_wrappers(WrappersMP.APPLY_MODEL, transformer_options)
        ).execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        t = self.model_sampling.timestep(t).float()
        # ComfyUI: self.diffusion_model(xc, t, context=context, control=..., transformer_options=...);
        # a diffusers UNet takes the context as encoder_hidden_states.
        model_output = self.diffusion_model(xc, t, encoder_hidden_states=c_crossattn).sample
        return self.model_sampling.calculate_denoised(sigma, model_output.float(), x)


def calculate_weight(patches, weight, key):  # comfy/lora.py, the "lora" patch type only
    for strength, v, strength_model, _offset, _function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        kind, (up, down, alpha, mid) = v
        assert kind == "lora" and mid is None
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight += (strength * scale * (up.flatten(1).float() @ down.flatten(1).float())).reshape(weight.shape)
    return weight


class ModelPatcher:  # comfy/model_patcher.py
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size, self.weight_inplace_update = size, weight_inplace_update
        self.patches, self.backup = {}, {}
        self.model_options = {"transformer_options": {}}
        self.parent = None
        self.callbacks, self.wrappers = {}, {}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.backup, n.parent = self.backup, self
        for k, c in self.callbacks.items():
            n.callbacks[k] = {k1: c1.copy() for k1, c1 in c.items()}
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            if k in model_sd:
                p.add(k)
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model, None, None))
        return list(p)

    def patch_model(self):  # the weight part of ModelPatcher.load / patch_weight_to_device
        for key, patches in self.patches.items():
            param = self.model.get_parameter(key)
            self.backup[key] = param.detach().clone()
            with torch.no_grad():
                param.copy_(calculate_weight(patches, param.detach().float().clone(), key).to(param.dtype))

    def unpatch_model(self):
        for key, weight in self.backup.items():
            with torch.no_grad():
                self.model.get_parameter(key).copy_(weight)
        self.backup.clear()

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def get_all_callbacks(self, call_type):
        return [c for cs in self.callbacks.get(call_type, {}).values() for c in cs]

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def pre_run(self):
        for callback in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            callback(self)

    def cleanup(self):
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            callback(self)


LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def model_lora_keys_clip(model, key_map={}):  # comfy/lora.py (the CLIP-L part)
    sdk = model.state_dict().keys()
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = k
    return key_map


def load_lora(lora, to_load, log_missing=True):  # comfy/lora.py (regular kohya keys)
    patch_dict = {}
    for x in to_load:
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.lora_up.weight" in lora:
            patch_dict[to_load[x]] = ("lora", (lora[f"{x}.lora_up.weight"], lora[f"{x}.lora_down.weight"], alpha, None))
    return patch_dict


class SD1ClipModel(torch.nn.Module):
    """comfy/sd1_clip.py SD1ClipModel: keys ``clip_l.transformer.text_model.encoder.layers...``
    (comfy/clip_model.py CLIPTextModel holds ``text_model``); the transformers CLIP goes there."""

    def __init__(self, text_model):
        super().__init__()
        self.clip_l = torch.nn.Module()
        self.clip_l.transformer = torch.nn.Module()
        self.clip_l.transformer.text_model = text_model


class CLIP:  # comfy/sd.py
    def __init__(self, cond_stage_model=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model, torch.device("cpu"), torch.device("cpu"))

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):  # comfy/k_diffusion/sampling.py
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def simple_scheduler(model_sampling, steps):  # comfy/samplers.py
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def calculate_sigmas(model_sampling, scheduler_name, steps):  # comfy/samplers.py
    if scheduler_name == "karras":
        return get_sigmas_karras(
            n=steps, sigma_min=float(model_sampling.sigma_min), sigma_max=float(model_sampling.sigma_max)
        )
    return simple_scheduler(model_sampling, steps)


def outer_sample(patcher, noise, sigmas, cond, uncond, cfg=4.0):
    """CFGGuider.outer_sample + sample_euler + calc_cond_batch (comfy/samplers.py, k_diffusion/sampling.py)."""
    model_options = copy_nested_dicts(patcher.model_options)
    # comfy/sampler_helpers.py prepare_model_patcher
    model_options["transformer_options"]["wrappers"] = copy_nested_dicts(patcher.wrappers)
    model_options["transformer_options"]["callbacks"] = copy_nested_dicts(patcher.callbacks)
    model = patcher.model
    patcher.patch_model()  # load_models_gpu in prepare_sampling: weight patches of other LoRAs
    x = noise * sigmas[0]
    try:
        patcher.pre_run()
        with torch.no_grad():
            for i in range(len(sigmas) - 1):
                sigma = sigmas[i] * x.new_ones([x.shape[0]])
                to = model_options["transformer_options"].copy()
                to["sigmas"] = sigma
                out = model.apply_model(
                    torch.cat([x, x]),
                    torch.cat([sigma, sigma]),
                    c_crossattn=torch.cat([cond, uncond]),
                    transformer_options=to,
                )
                cond_out, uncond_out = out.chunk(2)
                denoised = uncond_out + (cond_out - uncond_out) * cfg
                d = (x - denoised) / sigmas[i]
                x = x + d * (sigmas[i + 1] - sigmas[i])
    finally:
        patcher.cleanup()
    patcher.unpatch_model()
    return x


def comfy_modules(lora_dir) -> dict[str, types.ModuleType]:
    """``folder_paths`` (its "loras" folder is ``lora_dir``) and the ``comfy.*`` modules the extension
    imports, built from the stand-ins above; put them in ``sys.modules`` before loading the node."""
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder_name: sorted(os.listdir(lora_dir)) if folder_name == "loras" else []

    def get_full_path(folder_name, filename):
        path = os.path.join(lora_dir, filename)
        return path if folder_name == "loras" and os.path.isfile(path) else None

    def get_full_path_or_raise(folder_name, filename):
        path = get_full_path(folder_name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return path

    folder_paths.get_full_path, folder_paths.get_full_path_or_raise = get_full_path, get_full_path_or_raise
    pkg = types.ModuleType("comfy")
    pkg.__path__ = []
    ext = types.ModuleType("comfy.patcher_extension")
    for obj in (CallbacksMP, WrappersMP, WrapperExecutor, get_all_wrappers, copy_nested_dicts):
        setattr(ext, obj.__name__, obj)
    lora = types.ModuleType("comfy.lora")
    lora.load_lora, lora.model_lora_keys_clip, lora.calculate_weight = load_lora, model_lora_keys_clip, calculate_weight
    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = ModelPatcher
    pkg.patcher_extension, pkg.lora, pkg.model_patcher = ext, lora, mp
    return {
        "folder_paths": folder_paths,
        "comfy": pkg,
        "comfy.patcher_extension": ext,
        "comfy.lora": lora,
        "comfy.model_patcher": mp,
    }
