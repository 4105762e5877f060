"""An import-only ``torchvision`` for the real-code tests (ComfyUI, Forge's k_diffusion).

Why a stub: the registry's torchvision wheels are CUDA builds whose C ops fail to register against
the CPU torch 2.13.0 this project pins ("operator torchvision::nms does not exist"), and installing
torchvision's CPU build would replace torch. The real tools import torchvision only at module level
for paths these tests never run (ComfyUI: Stable Cascade's EfficientNet, Cosmos and ACE transforms;
Forge: ``k_diffusion/utils.py`` image helpers). Any attribute use raises AttributeError.
Install it after ``transformers`` has been imported (its availability check then already said no).
"""

import importlib.machinery
import sys
import types


class _Missing(types.ModuleType):
    def __getattr__(self, name):
        raise AttributeError(f"torchvision stub: {self.__name__}.{name} was used; these tests must not need it")


def install() -> None:
    """Put the stub in ``sys.modules`` unless a real torchvision is importable."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    root = _Missing("torchvision")
    for sub in ("transforms", "transforms.functional", "models", "io", "ops"):
        name = f"torchvision.{sub}"
        module = _Missing(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
        parent = sys.modules["torchvision." + sub.rsplit(".", 1)[0]] if "." in sub else root
        types.ModuleType.__setattr__(parent, sub.rsplit(".", 1)[-1], module)
    root.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    root.__path__ = []
    sys.modules["torchvision"] = root
