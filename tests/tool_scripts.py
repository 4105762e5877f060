"""The scripts under tools/, loaded as ``python tools/<name>.py`` runs them (through the file, so
a shim's ``sys.path`` line and import are exercised too)."""

import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_path(name: str) -> str:
    """``<repo>/tools/<name>.py``."""
    return os.path.join(ROOT, "tools", f"{name}.py")


def tool_module(name: str) -> ModuleType:
    """tools/<name>.py executed as a module (its ``if __name__ == "__main__"`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", tool_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_main(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv) -> exit status`` of tools/<name>.py."""
    return tool_module(name).main
