"""ComfyUI custom node package of tsm-trainer: `Load TSM LoRA` (see README.md here).

ComfyUI imports this folder from ``ComfyUI/custom_nodes/``. The node is a thin adapter; the
logic lives in the ``tsm_trainer`` package (``tsm_trainer.runtime.online``). When ``tsm_trainer`` is
not installed into ComfyUI's Python, the repository this folder belongs to is put on
``sys.path`` (resolved through symlinks, so a symlinked folder works).
"""

import os
import sys

try:
    import tsm_trainer
except ImportError:
    _repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if os.path.isdir(os.path.join(_repo, "tsm_trainer")) and _repo not in sys.path:
        sys.path.append(_repo)  # appended: ComfyUI's own top-level modules keep precedence
    import tsm_trainer  # noqa: F401

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
