"""How the timestep reaches the LoRA modules (docs/design.md section 3).

A :class:`TimestepContext` belongs to one network (never global, so two networks in a
process don't see each other's t). :class:`TimestepCapture` fills it from a forward
pre-hook on the denoiser, and re-installs the same t when autograd reaches that call's
output, so gradient checkpointing recomputes with the t of the first forward even when the
denoiser ran again (with another t) before backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from tsm_trainer.core.intervals import expert_index
from tsm_trainer.families import family_specs

# Parameter names under which denoisers receive the timestep, in lookup order.
TIMESTEP_ARG_NAMES = ("timestep", "timesteps", "t")
# Parameter names of the main input, used to read the batch size for a 0-d timestep.
SAMPLE_ARG_NAMES = ("sample", "hidden_states", "x", "img")


def sigma_input_classes() -> frozenset[str]:
    """Denoiser classes that receive sigma in [0, 1] instead of t (Flux): t = sigma * T (the family specs'
    ``sigma_input_classes``)."""
    return frozenset(c for spec in family_specs() for c in spec.sigma_input_classes)


@dataclass
class Routing:
    """Which expert of one scale each sample of the current call uses.

    Attributes:
        experts: distinct experts used, ascending.
        slot: (B,) long tensor on CPU: ``experts[slot[b]]`` is sample b's expert.
    """

    experts: list[int]
    slot: torch.Tensor

    def onehot(self) -> torch.Tensor:
        """(B, len(experts)) float32 one-hot routing matrix on CPU."""
        return torch.nn.functional.one_hot(self.slot, len(self.experts)).float()


class TimestepContext:
    """The timesteps of the denoiser call in progress, for one network.

    ``t`` is a (B,) float64 CPU tensor on the 0..T axis. Routing per scale is computed once
    per call and shared by every module.
    """

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps
        self._t: torch.Tensor | None = None
        self._routing: dict[int, Routing] = {}
        self._t_index: dict = {}
        self.cache: dict = {}
        self.allowed_interval: tuple[int, int] | None = None  # (expert, scale) when training one expert

    @property
    def t(self) -> torch.Tensor | None:
        return self._t

    def set(self, t: torch.Tensor | float | int | None, batch_size: int | None = None) -> None:
        """Set the timesteps of the next denoiser call.

        Args:
            t: number, 0-d or (B,) tensor on the 0..T axis; None clears.
            batch_size: broadcast a single t to this many samples.
        """
        self._routing = {}
        self._t_index = {}
        self.cache = {}  # per-call values modules share (routing masks), dropped with t
        if t is None:
            self._t = None
            return
        t = torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1)
        if t.numel() == 1 and batch_size is not None and batch_size > 1:
            t = t.expand(batch_size)
        elif batch_size is not None and t.numel() != batch_size:
            raise ValueError(f"timestep has {t.numel()} values but the batch has {batch_size} samples")
        if self.allowed_interval is not None:
            expert, n = self.allowed_interval
            wrong = expert_index(t, n, self.num_train_timesteps) != expert
            if bool(wrong.any()):
                from tsm_trainer.core.intervals import interval_timestep_range

                lo, hi = interval_timestep_range(expert, n, self.num_train_timesteps)
                raise ValueError(
                    f"tsm_interval={expert} (scale {n}) trains only timesteps in [{lo}, {hi}), but the denoiser "
                    f"received t={t[wrong].tolist()}; restrict sampling with --min_timestep {lo} --max_timestep {hi}"
                )
        self._t = t.contiguous()

    def clear(self) -> None:
        self.set(None)

    def require(self, module_name: str) -> torch.Tensor:
        if self._t is None:
            raise RuntimeError(
                f"TSM module {module_name} was called with no timestep set. Apply the network to the denoiser "
                "(network.apply_to, or TSMNetwork.attach) so its forward hook captures t, or call "
                "network.set_timesteps(t) before calling the model directly."
            )
        return self._t

    def routing(self, n: int) -> Routing:
        """Routing of the current samples at scale ``n`` (cached for this call)."""
        r = self._routing.get(n)
        if r is None:
            assert self._t is not None, "routing before set(): modules call require() first"
            idx = expert_index(self._t, n, self.num_train_timesteps)
            experts, slot = torch.unique(idx, sorted=True, return_inverse=True)
            r = self._routing[n] = Routing(experts.tolist(), slot)
        return r

    def t_index(self, device: torch.device) -> torch.Tensor:
        """(B,) long tensor ``floor(t)`` clamped to [0, T-1] on ``device`` (router embedding rows)."""
        idx = self._t_index.get(device)
        if idx is None:
            assert self._t is not None, "t_index before set(): modules call require() first"
            idx = self._t.floor().long().clamp_(0, self.num_train_timesteps - 1)
            idx = self._t_index[device] = idx.to(device, non_blocking=True)
        return idx


class TimestepCapture:
    """Forward hooks on a denoiser that feed its timestep argument into a context.

    Args:
        denoiser: the UNet / transformer (diffusers or sd-scripts classes).
        context: the network's context.
        timestep_scale: multiply the received value by this to get t on the 0..T axis;
            None picks ``T`` for denoisers that receive sigma (Flux) and 1 otherwise.
        arg_name: name of the timestep parameter; None finds it in the forward signature.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        context: TimestepContext,
        timestep_scale: float | None = None,
        arg_name: str | None = None,
    ):
        self.context = context
        cls = type(denoiser).__name__
        if timestep_scale is None:
            timestep_scale = float(context.num_train_timesteps) if cls in sigma_input_classes() else 1.0
        self.timestep_scale = timestep_scale
        params = [
            p
            for p in inspect.signature(denoiser.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        names = [p.name for p in params]
        if arg_name is None:
            arg_name = next((a for a in TIMESTEP_ARG_NAMES if a in names), None)
        if arg_name is None or arg_name not in names:
            raise ValueError(
                f"cannot find the timestep argument of {cls}.forward{tuple(names)}; expected one of "
                f"{TIMESTEP_ARG_NAMES} (pass arg_name=...)"
            )
        self.arg_name = arg_name
        self.arg_pos = (
            names.index(arg_name) if params[names.index(arg_name)].kind != inspect.Parameter.KEYWORD_ONLY else None
        )
        sample = next((a for a in SAMPLE_ARG_NAMES if a in names), names[0] if names else None)
        self.sample_name = sample
        self.sample_pos = names.index(sample) if sample in names else None
        self._handles = [
            denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            denoiser.register_forward_hook(self._post_hook),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _arg(self, args, kwargs, name, pos):
        if name in kwargs:
            return kwargs[name]
        if pos is not None and pos < len(args):
            return args[pos]
        return None

    def _pre_hook(self, module, args, kwargs):
        t = self._arg(args, kwargs, self.arg_name, self.arg_pos)
        if t is None:
            raise ValueError(f"{type(module).__name__} was called without its timestep argument '{self.arg_name}'")
        sample = self._arg(args, kwargs, self.sample_name, self.sample_pos)
        batch = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() > 0 else None
        t = torch.as_tensor(t).detach().to("cpu", torch.float64)
        if self.timestep_scale != 1.0:
            t = t * self.timestep_scale
        self.context.set(t, batch)
        return None

    def _post_hook(self, module, args, output):
        if not torch.is_grad_enabled():
            return None
        t = self.context.t

        def restore(grad):
            # Autograd reaches this call's output before recomputing its checkpointed blocks.
            if self.context.t is not t:
                self.context.set(t)
            return None

        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(restore)
        return None


def _tensors(obj):
    """Tensors in a denoiser output (tensor, tuple/list, dict, diffusers BaseOutput)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # BaseOutput is an OrderedDict
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors(v)
