"""tsm-trainer core: TimeStep Master LoRA experts (intervals, modules, routers, file format).

Imports no trainer, UI or model library beyond torch and safetensors.
"""

from tsm_trainer.core.intervals import expert_index, interval_bounds, interval_timestep_range, parse_scales
from tsm_trainer.core.network import TSMConfig, TSMNetwork
from tsm_trainer.core.timestep import TimestepCapture, TimestepContext

__all__ = [
    "TSMConfig",
    "TSMNetwork",
    "TimestepCapture",
    "TimestepContext",
    "expert_index",
    "interval_bounds",
    "interval_timestep_range",
    "parse_scales",
]
