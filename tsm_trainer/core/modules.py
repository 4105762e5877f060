"""LoRA wrappers of one Linear or Conv2d (docs/design.md section 2).

Like kohya's lora.py, a wrapper replaces ``org_module.forward`` and keeps the base module
untouched, so the model's own state dict never changes. Two kinds:

* :class:`LoRAModule`: one plain LoRA (shared text-encoder LoRA; keys ``.lora_down.weight``).
* :class:`TSMLoRAModule`: timestep experts at one or more scales, per-sample routing,
  optional router (asymmetric or symmetric mixture); keys ``.tsm.{n}.{e}.lora_down.weight``.

Routing is computed with two matmuls whatever the batch holds: the down factors of the
experts in use are concatenated, the (B, U*r) hidden is multiplied by each sample's one-hot
(times its gate), and the concatenated up factors map it back. Experts no sample uses never
enter the graph, so their ``grad`` stays None and the optimizer skips them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tsm_trainer.core.lora_math import pair_delta
from tsm_trainer.core.router import Router, pool_input
from tsm_trainer.core.timestep import TimestepContext
from tsm_trainer.core.torch_compat import autocast_enabled

MIXTURES = ("asymmetric", "symmetric")


class LoRAPair(nn.Module):
    """One LoRA: ``lora_down`` A (r x k [x kh x kw]) and ``lora_up`` B (d x r [x 1 x 1]), B zero."""

    lora_down: nn.Linear | nn.Conv2d
    lora_up: nn.Linear | nn.Conv2d

    def __init__(self, org_module: nn.Module, rank: int):
        super().__init__()
        if isinstance(org_module, nn.Conv2d):
            kernel = cast(tuple[int, int], org_module.kernel_size)
            self.lora_down = nn.Conv2d(org_module.in_channels, rank, kernel, bias=False)
            self.lora_up = nn.Conv2d(rank, org_module.out_channels, (1, 1), bias=False)
        else:
            linear = cast(nn.Linear, org_module)
            self.lora_down = nn.Linear(linear.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, linear.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)


class _WrappedModule(nn.Module):
    """What both wrappers share: forward replacement, dropout, weight merging."""

    alpha: torch.Tensor  # buffer: float(alpha), saved as ``<name>.alpha``
    lora_down: nn.Linear | nn.Conv2d
    lora_up: nn.Linear | nn.Conv2d

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA targets nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        if isinstance(org_module, nn.Conv2d) and org_module.groups != 1:
            raise TypeError(f"{lora_name}: grouped convolutions (groups={org_module.groups}) are not supported")
        self.lora_name = lora_name
        self.lora_dim = rank
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if alpha is None or alpha == 0:
            alpha = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org: list[nn.Linear | nn.Conv2d] = [org_module]  # a list: not a submodule of the network
        self._org_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._previous_forward: Callable[..., torch.Tensor] | None = None
        self._backup: torch.Tensor | None = None

    @property
    def org_module(self) -> nn.Linear | nn.Conv2d:
        return self._org[0]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.lora_dim

    # -- install / remove -------------------------------------------------------------
    def apply_to(self) -> None:
        if self._org_forward is not None:
            return
        # An earlier wrapper (another network) may already sit on the instance: keep it.
        self._previous_forward = self.org_module.__dict__.get("forward")
        self._org_forward = self.org_module.forward
        self.org_module.forward = self.forward  # type: ignore[method-assign]

    def remove(self) -> None:
        """Uninstall; wrappers stacked on one layer come off in reverse order."""
        if self._org_forward is None:
            return
        if self.org_module.__dict__.get("forward") != self.forward:
            raise RuntimeError(
                f"{self.lora_name}: another wrapper was installed on this layer after this one; remove that one first"
            )
        if self._previous_forward is None:
            del self.org_module.forward  # back to the class method
        else:
            self.org_module.forward = self._previous_forward  # type: ignore[method-assign]
        self._org_forward = None

    # -- functional pieces ----------------------------------------------------------------
    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self._org_forward is not None, f"{self.lora_name}: forward before apply_to"
        return self._org_forward(x)

    def _down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        org = self.org_module
        if isinstance(org, nn.Conv2d):
            return F.conv2d(x, weight, None, org.stride, cast(tuple[int, int], org.padding), org.dilation)
        return F.linear(x, weight)

    def _up(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, weight) if self.is_conv else F.linear(h, weight)

    def _skip(self) -> bool:
        if self.multiplier == 0:
            return True
        return bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)

    def _regularise(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Neuron and rank dropout on the (.., R) hidden, as kohya's lora.py; returns the extra scale."""
        extra = 1.0
        if not self.training:
            return h, extra
        if self.dropout:
            h = F.dropout(h, p=self.dropout)
        if self.rank_dropout:
            ch = 1 if self.is_conv else -1
            shape = [h.shape[0]] + [1] * (h.dim() - 1)
            shape[ch] = h.shape[ch]
            h = h * (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            extra = 1.0 / (1.0 - self.rank_dropout)
        return h, extra

    # ΔW = B A in the base weight's layout (kept as a method: networks/tsm_lora.py calls it on modules)
    pair_delta = staticmethod(pair_delta)

    # -- weight merging -----------------------------------------------------------------
    def backup_weights(self) -> None:
        """Keep an exact copy of the base weight (restore_weights puts it back bit for bit)."""
        if self._backup is None:
            self._backup = self.org_module.weight.detach().clone()

    def restore_weights(self) -> None:
        if self._backup is not None:
            with torch.no_grad():
                self.org_module.weight.copy_(self._backup)
            self._backup = None

    def merge_delta(self, delta: torch.Tensor, multiplier: float = 1.0) -> None:
        """``W += multiplier * (alpha/r) * delta`` in the base weight's dtype (backs W up first)."""
        self.backup_weights()
        w = self.org_module.weight
        with torch.no_grad():
            w.copy_((w.float() + multiplier * self.scale * delta.to(w.device, torch.float32)).to(w.dtype))


class LoRAModule(_WrappedModule):
    """A plain LoRA (vanilla, shared across timesteps): ``y = W x + s (alpha/r) B A x``."""

    def __init__(self, lora_name: str, org_module: nn.Module, rank: int, alpha: float | None, **kwargs):
        super().__init__(lora_name, org_module, rank, alpha, **kwargs)
        pair = LoRAPair(org_module, rank)
        self.lora_down, self.lora_up = pair.lora_down, pair.lora_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self._skip():
            return out
        h = self._down(_match_dtype(x, self.lora_down.weight), self.lora_down.weight)
        h, extra = self._regularise(h)
        lora = self._up(h, self.lora_up.weight)
        return out + (lora * (self.multiplier * self.scale * extra)).to(out.dtype)

    def delta(self) -> torch.Tensor:
        return self.pair_delta(self.lora_down.weight.float(), self.lora_up.weight.float())

    def merge(self, multiplier: float | None = None) -> None:
        self.merge_delta(self.delta(), self.multiplier if multiplier is None else multiplier)


class TSMLoRAModule(_WrappedModule):
    """Timestep experts of one base module.

    Args:
        lora_name: kohya name (``lora_unet_...``).
        org_module: the frozen Linear or Conv2d.
        context: the network's timestep context.
        scales: scales evaluated in forward, core first. One scale while fostering.
        experts: for each scale, the experts this module holds (all of them by default;
            one when training a single interval).
        rank, alpha: LoRA rank and alpha (one alpha per module).
        mixture: None while fostering (one scale, no router); "asymmetric" (core ungated,
            scales[1:] gated) or "symmetric" (all gated) while assembling.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        context: TimestepContext,
        scales: list[int],
        rank: int,
        alpha: float | None,
        experts: dict[int, list[int]] | None = None,
        mixture: str | None = None,
        **kwargs,
    ):
        super().__init__(lora_name, org_module, rank, alpha, **kwargs)
        if mixture is None and len(scales) != 1:
            raise ValueError(f"{lora_name}: fostering trains one scale at a time, got scales {scales}")
        if mixture is not None and mixture not in MIXTURES:
            raise ValueError(f"tsm_mixture must be one of {MIXTURES}, got {mixture!r}")
        self.context = context
        self.scales = list(scales)
        self.mixture = mixture
        experts = experts or {n: list(range(n)) for n in scales}
        self.tsm = nn.ModuleDict(
            {str(n): nn.ModuleDict({str(e): LoRAPair(org_module, rank) for e in experts[n]}) for n in scales}
        )
        self._pairs = {(n, int(e)): pair for n in scales for e, pair in self._scale(n).items()}
        self.router = None
        if mixture is not None:
            gates = len(scales) - 1 if mixture == "asymmetric" else len(scales)
            org = self.org_module
            k = org.in_channels if isinstance(org, nn.Conv2d) else org.in_features
            self.router = Router(k, gates, context.num_train_timesteps)

    @property
    def num_experts(self) -> int:
        """Experts this module holds, all scales together."""
        return len(self._pairs)

    def _scale(self, n: int) -> dict[str, LoRAPair]:
        """``{str(e): pair}`` of scale n (an nn.ModuleDict of LoRAPair)."""
        return cast(dict[str, LoRAPair], self.tsm[str(n)])

    def expert(self, n: int, e: int) -> LoRAPair:
        return self._scale(n)[str(e)]

    def _expert_or_error(self, n: int, e: int) -> LoRAPair:
        experts = self._scale(n)
        if str(e) not in experts:
            raise RuntimeError(
                f"{self.lora_name}: a sample needs expert {e} of scale {n}, which this network does not hold "
                f"(it holds {sorted(int(k) for k in experts)})"
            )
        return experts[str(e)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self._skip():
            return out
        ctx = self.context
        ctx.require(self.lora_name)
        x = _match_dtype(x, next(iter(self._pairs.values())).lora_down.weight)
        plan = self._plan(x)
        pairs = self._pairs_in_use(plan.experts)
        if plan.single:
            # One expert for the whole batch: a plain LoRA matmul (the inference case).
            pair = pairs[0]
            h, extra = self._regularise(self._down(x, pair.lora_down.weight))
            lora = self._up(h, pair.lora_up.weight)
            return out + (lora * (self.multiplier * self.scale * extra)).to(out.dtype)

        downs = [p.lora_down.weight for p in pairs]
        ups = [p.lora_up.weight for p in pairs]
        down = downs[0] if len(downs) == 1 else torch.cat(downs, 0)
        up = ups[0] if len(ups) == 1 else torch.cat(ups, 1)
        h = self._down(x, down)
        mask = plan.mask  # per-sample one-hot over the U*r columns, times multiplier * alpha / r
        if self.router is not None:
            pooled = pool_input(x, 1 if self.is_conv else -1)
            if plan.per_sample > 1:
                pooled = pooled.view(-1, plan.per_sample, pooled.shape[-1]).mean(1)
            gates = self.router(pooled, ctx.t_index(x.device))  # (B, G)
            if self.mixture == "asymmetric":
                gates = torch.cat([gates.new_ones(gates.shape[0], 1), gates], 1)  # the core is ungated
            gates = gates[:, plan.column_scale]  # (B, U*r): each column's gate
            if plan.per_sample > 1:
                gates = gates.repeat_interleave(plan.per_sample, 0)
            mask = mask * gates.view(mask.shape).to(mask.dtype)
        h, extra = self._regularise(h * mask.to(h.dtype))
        lora = self._up(h, up)
        if extra != 1.0:
            lora = lora * extra
        return out + lora.to(out.dtype)

    def _pairs_in_use(self, experts: list[tuple[int, int]]) -> list[LoRAPair]:
        try:
            return [self._pairs[k] for k in experts]
        except KeyError as e:
            n, i = e.args[0]
            return [self._expert_or_error(n, i)]  # raises with the experts this module holds

    def _plan(self, x: torch.Tensor) -> _Plan:
        """Experts in use and the routing mask for this call, shared by modules of one shape."""
        ctx = self.context
        rows = x.shape[0]
        layout = 4 if self.is_conv else x.dim()
        key = (
            "plan",
            tuple(self.scales),
            self.router is not None,
            self.lora_dim,
            rows,
            layout,
            x.device,
            self.multiplier * self.scale,
        )
        plan = ctx.cache.get(key)
        if plan is None:
            plan = ctx.cache[key] = _Plan.build(
                ctx,
                self.scales,
                self.router is not None,
                self.lora_dim,
                rows,
                layout,
                x.device,
                self.multiplier * self.scale,
                self.lora_name,
            )
        return plan

    def expert_delta(self, n: int, e: int) -> torch.Tensor:
        """ΔW = B_e A_e of expert e of scale n, float32, in the base weight's layout."""
        pair = self._expert_or_error(n, e)
        return self.pair_delta(pair.lora_down.weight.float(), pair.lora_up.weight.float())

    def merge_expert(self, n: int, e: int, multiplier: float | None = None) -> None:
        """Merge one expert into the base weight (backs it up; restore_weights undoes it exactly)."""
        self.merge_delta(self.expert_delta(n, e), self.multiplier if multiplier is None else multiplier)


class _Plan:
    """Routing of one denoiser call for modules with the same scales, rank and input layout.

    Attributes:
        experts: (scale, expert) in use, in column order.
        single: one expert for the whole batch and no router: the plain LoRA path.
        mask: (rows, U*r) one-hot of each row's expert columns times multiplier * alpha / r,
            viewed for broadcasting against the hidden ((rows, 1.., U*r) or (rows, U*r, 1, 1)).
        column_scale: (U*r,) index of the scale of each column (selects its gate).
        per_sample: rows per timestep (>1 when a block folds frames or pixels into the batch).
    """

    def __init__(self, experts, single, mask, column_scale, per_sample):
        self.experts, self.single, self.mask, self.column_scale, self.per_sample = (
            experts,
            single,
            mask,
            column_scale,
            per_sample,
        )

    @classmethod
    def build(
        cls,
        ctx: TimestepContext,
        scales,
        has_router: bool,
        rank: int,
        rows: int,
        layout: int,
        device: torch.device,
        scale: float,
        lora_name: str,
    ) -> _Plan:
        routings = [ctx.routing(n) for n in scales]
        batch = routings[0].slot.shape[0]
        if rows % batch:
            raise RuntimeError(f"{lora_name}: input has {rows} rows, not a multiple of the {batch} timesteps")
        per_sample = rows // batch
        experts = [(n, e) for n, r in zip(scales, routings) for e in r.experts]
        single = not has_router and len(experts) == 1
        mask = column_scale = None
        if not single:
            onehot = torch.cat([r.onehot() for r in routings], 1) * scale
            mask = onehot.repeat_interleave(rank, 1).repeat_interleave(per_sample, 0)
            shape = (rows, -1, 1, 1) if layout == 4 else (rows, *([1] * (layout - 2)), -1)
            mask = mask.view(shape).to(device)
            column_scale = torch.tensor(
                [j for j, r in enumerate(routings) for _ in range(len(r.experts) * rank)], device=device
            )
        return cls(experts, single, mask, column_scale, per_sample)


def _match_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cast x to the LoRA dtype unless autocast does it (e.g. bf16 activations, fp32 LoRA)."""
    if x.dtype == weight.dtype or autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)
