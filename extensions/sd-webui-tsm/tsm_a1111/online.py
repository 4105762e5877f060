"""Assembled files (routers) in A1111: the UNet layers are wrapped and compute core + gated
context experts per sample (``tsm_trainer.runtime.online.OnlineTSM``), with t read from the UNet call.

The router's gates depend on the layer input, so these files cannot be merged into weights.
"""

from __future__ import annotations

import torch
from torch import nn

from tsm_trainer.core.timestep import TimestepContext


class UNetTimestepHook:
    """A forward pre-hook on A1111's UNet (ldm/sgm ``UNetModel.forward(x, timesteps, context, ...)``)
    that sets the context's t from the ``timesteps`` it receives.

    It reads ``timesteps`` by keyword or as the second positional argument and never inspects
    ``forward``'s signature: ControlNet replaces ``UNetModel.forward`` with ``(*args, **kwargs)``.
    The hook goes through ``nn.Module.__call__``, so it runs whatever ``forward`` is.
    """

    def __init__(self, unet: nn.Module, context: TimestepContext):
        self.context = context
        self._handle = unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        t = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        if t is None:
            raise ValueError(
                f"{type(module).__name__} was called without `timesteps` (by keyword or second "
                "positional argument); sd-webui-tsm cannot route an assembled TSM file"
            )
        x = kwargs.get("x", args[0] if args else None)
        batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        self.context.set(torch.as_tensor(t).detach().to("cpu"), batch)
        return None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
