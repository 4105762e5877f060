"""Import the real AUTOMATIC1111 webui (``TSM_A1111_DIR``, a checkout with its ``repositories/``:
stable-diffusion-stability-ai, generative-models, k-diffusion) into this process, with stubs only
for gradio/fastapi/starlette, and for torchvision and timm (imported at module level by open_clip,
sgm and ldm's MiDaS; no CPU torchvision wheel exists for this project's torch). Settings are the
webui's own defaults (``shared_init.initialize`` with a temporary ``--data-dir``, CPU, full
precision).

The venv: a ``.pth`` onto the project's venv (torch 2.13 CPU, diffusers, transformers) plus, with
``pip install --no-deps``, the webui's module-level imports: aenum==3.1.15 antlr4-python3-runtime==4.9.3
blendmodes==2022 clean-fid==0.1.35 clip-anytorch==2.6.0 deprecation==2.1.0 einops==0.4.1 ftfy==6.1.1
GitPython==3.1.32 gitdb==4.0.11 smmap==5.0.1 imageio==2.37.0 inflection==0.5.1 jsonmerge==1.8.0
jsonschema==4.21.1 jsonschema-specifications==2023.12.1 referencing==0.33.0 rpds-py==0.18.0 attrs==23.2.0
kornia==0.6.7 lark==1.1.2 lazy_loader==0.4 lightning-utilities==0.10.1 networkx==3.4.2 omegaconf==2.2.3
open-clip-torch==2.20.0 opencv-python-headless==4.11.0.86 piexif==1.1.3 pytorch-lightning==1.9.4
pytz==2024.1 resize-right==0.0.2 scikit-image==0.25.2 scipy==1.16.3 tifffile==2025.5.10 tomesd==0.1.3
torchdiffeq==0.2.3 torchmetrics==1.3.1 torchsde==0.2.6 trampoline==0.1.2 wcwidth==0.2.13.

Used by ``tests/test_ext_a1111_real.py`` only; it patches ``torch.nn.Linear.forward`` & co. as the
built-in Lora extension does, so run that file on its own:
``TSM_A1111_DIR=/path/to/webui /path/to/venv/bin/python -m pytest tests/test_ext_a1111_real.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUBBED = ("gradio", "fastapi", "starlette", "torchvision", "timm")


class _Anything(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything


class Anything(metaclass=_Anything):
    """Any attribute, call, subclass or context: what UI-layer code does with gradio at import."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def getattr_(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Anything

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


def load(a1111_dir: str):
    """Import the webui and its built-in Lora extension; returns a namespace of the real modules."""
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # cached as False before the stub exists
    import_utils.is_torchvision_v2_available()
    sys.meta_path.insert(0, _StubFinder())
    data = tempfile.mkdtemp(prefix="a1111-data-")
    lora_dir = os.path.join(data, "Lora")
    os.makedirs(lora_dir)
    sys.argv = [
        sys.argv[0],
        "--data-dir",
        data,
        "--use-cpu",
        "all",
        "--no-half",
        "--no-half-vae",
        "--precision",
        "full",
        "--skip-torch-cuda-test",
        "--lora-dir",
        lora_dir,
    ]
    sys.path.insert(0, a1111_dir)
    # order matters: modules.paths puts ldm, sgm and k_diffusion on sys.path
    # isort: off
    import modules.paths  # noqa: F401
    import ldm.modules.encoders.modules  # noqa: F401  (modules/initialize.py imports() order)
    import sgm.modules.encoders.modules  # noqa: F401

    # isort: on
    from modules import shared_init

    shared_init.initialize()
    from modules import (  # noqa: F401
        devices,
        extra_networks,
        processing,
        prompt_parser,
        script_callbacks,
        script_loading,
        sd_samplers,
        sd_samplers_extra,
        sd_samplers_kdiffusion,
        sd_samplers_timesteps,
        sd_samplers_timesteps_impl,
        shared,
        ui_extra_networks,
    )

    # the built-in Lora extension, loaded as modules/scripts.py does (its folder first on sys.path)
    lora_ext = os.path.join(a1111_dir, "extensions-builtin", "Lora")
    for name in ("networks", "network"):  # never the tsm-trainer repo's `networks/` package
        if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")).startswith(lora_ext):
            del sys.modules[name]
    sys.path.insert(0, lora_ext)
    script_loading.load_module(os.path.join(lora_ext, "scripts", "lora_script.py"))
    import network

    import networks

    # this extension, through the same loader
    ext = REPO / "extensions" / "sd-webui-tsm"
    sys.path.insert(0, str(ext))
    tsm_script = script_loading.load_module(str(ext / "scripts" / "tsm_extension.py"))
    script_callbacks.before_ui_callback()  # registers Lora's and TSM's extra networks and pages

    shared.opts.live_previews_enable = False
    return types.SimpleNamespace(
        shared=shared,
        script_callbacks=script_callbacks,
        extra_networks=extra_networks,
        prompt_parser=prompt_parser,
        processing=processing,
        devices=devices,
        ui_extra_networks=ui_extra_networks,
        sd_samplers_kdiffusion=sd_samplers_kdiffusion,
        sd_samplers_timesteps=sd_samplers_timesteps,
        sd_samplers_timesteps_impl=sd_samplers_timesteps_impl,
        sd_samplers_extra=sd_samplers_extra,
        network=network,
        networks=networks,
        tsm_script=tsm_script,
        lora_dir=lora_dir,
        data=data,
        k_sampling=importlib.import_module("k_diffusion.sampling"),
        k_external=importlib.import_module("k_diffusion.external"),
        openaimodel=importlib.import_module("ldm.modules.diffusionmodules.openaimodel"),
    )
