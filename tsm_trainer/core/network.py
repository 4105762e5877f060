"""The TSM network: LoRA wrappers on a denoiser (timestep experts) and its text encoders
(one shared LoRA), the timestep capture, the file round trip and weight merging.

This is the generic core; ``networks/tsm_lora.py`` adapts it to sd-scripts and the
trainer drives it directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tsm_trainer.core import lora_math
from tsm_trainer.core.file_format import TSMFileError, check_state_dict, check_tsm_metadata, load_file, save_file_atomic
from tsm_trainer.core.intervals import parse_scales
from tsm_trainer.core.metadata import tsm_metadata
from tsm_trainer.core.modules import MIXTURES, LoRAModule, TSMLoRAModule
from tsm_trainer.core.targets import (
    CONV_TARGETS,
    all_layers,
    compile_patterns,
    denoiser_naming,
    find_targets,
    lora_name,
    text_encoder_key_path,
    text_encoder_kind,
    text_encoder_prefixes,
)
from tsm_trainer.core.tensor_checks import check_lora_tensors, check_tsm_file
from tsm_trainer.core.timestep import TimestepCapture, TimestepContext
from tsm_trainer.families import detect_family, unwrap_denoiser
from tsm_trainer.families.base import FamilySpec

STAGES = ("foster", "assemble")
logger = logging.getLogger(__name__)


@dataclass
class TSMConfig:
    """Everything that shapes a TSM network (saved as metadata, restored from files).

    Attributes:
        scales: core first. Fostering uses one scale; assembling uses all (e.g. [8, 1]).
        stage: "foster" (experts train) or "assemble" (experts frozen, routers train).
        mixture: "asymmetric" (core ungated) or "symmetric" (every scale gated); assemble only.
        interval: foster only one expert of ``scales[0]`` (timesteps outside it are an error).
        rank, alpha: LoRA rank and alpha of Linear and 1x1 conv modules.
        conv_rank, conv_alpha: rank and alpha of kxk convs (kohya's conv_dim); None: no kxk conv.
        dropout, rank_dropout, module_dropout: as kohya's lora.py (training only).
        denoiser_targets, text_encoder_targets: module-path patterns; None: the family's defaults.
        num_train_timesteps: T.
        timestep_scale: multiply the denoiser's timestep argument by this to get t; None: by family.
    """

    scales: list[int] = field(default_factory=lambda: [1])
    stage: str = "foster"
    mixture: str = "asymmetric"
    interval: int | None = None
    rank: int = 4
    alpha: float = 4.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    denoiser_targets: tuple[str, ...] | None = None
    text_encoder_targets: tuple[str, ...] | None = None
    num_train_timesteps: int = 1000
    timestep_scale: float | None = None

    def __post_init__(self):
        self.scales = parse_scales(self.scales)
        if self.stage not in STAGES:
            raise ValueError(f"tsm_stage must be one of {STAGES}, got {self.stage!r}")
        if self.mixture not in MIXTURES:
            raise ValueError(f"tsm_mixture must be one of {MIXTURES}, got {self.mixture!r}")
        if self.stage == "foster" and len(self.scales) != 1:
            raise ValueError(
                f"tsm_stage=foster trains one scale at a time; got tsm_scales={self.scales} "
                "(foster each scale separately, then assemble with tsm_scales=8,1)"
            )
        if self.stage == "assemble" and self.mixture == "asymmetric" and len(self.scales) < 2:
            raise ValueError(
                f"tsm_stage=assemble with the asymmetric mixture needs a core and at least one context "
                f"scale (e.g. tsm_scales=8,1); got {self.scales}"
            )
        if self.interval is not None:
            if self.stage != "foster":
                raise ValueError("tsm_interval applies to tsm_stage=foster only")
            if not 0 <= self.interval < self.scales[0]:
                raise ValueError(
                    f"tsm_interval={self.interval} is not an expert of scale {self.scales[0]} "
                    f"(valid: 0..{self.scales[0] - 1})"
                )
        if self.rank < 1:
            raise ValueError(f"network_dim must be >= 1, got {self.rank}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise ValueError(f"conv_dim must be >= 1, got {self.conv_rank}")
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"network_{name} must be a finite number, got {value}")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if p is not None and not 0 <= p < 1:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        if self.conv_rank is not None and self.conv_alpha is None:
            self.conv_alpha = float(self.conv_rank)

    @property
    def mixture_or_none(self) -> str | None:
        return self.mixture if self.stage == "assemble" else None


class TSMNetwork(nn.Module):
    """LoRA experts on ``denoiser`` and a shared LoRA on each text encoder.

    Modules are registered under their kohya names, so ``state_dict()`` keys are the file's
    keys. Nothing is installed until :meth:`apply` (wrappers) and :meth:`attach` (hooks).

    Args:
        config: the network's shape.
        denoiser: UNet / transformer (diffusers or sd-scripts class).
        text_encoders: zero or more text encoders (CLIP / OpenCLIP / T5).
        family: defaults and key names; detected from the denoiser when None.
        multiplier: the user's strength ``s``.
    """

    def __init__(
        self,
        config: TSMConfig,
        denoiser: nn.Module,
        text_encoders: Sequence[nn.Module | None] = (),
        family: FamilySpec | None = None,
        multiplier: float = 1.0,
        module_ranks: Mapping[str, int] | None = None,
    ):
        super().__init__()
        denoiser = unwrap_denoiser(denoiser)
        self.config = config
        self.family = family or detect_family(denoiser)
        self.multiplier = multiplier
        self.context = TimestepContext(config.num_train_timesteps)
        if config.interval is not None:
            self.context.allowed_interval = (config.interval, config.scales[0])
        self._capture: TimestepCapture | None = None
        self._pre_calculated = False
        common = dict(
            multiplier=multiplier,
            dropout=config.dropout,
            rank_dropout=config.rank_dropout,
            module_dropout=config.module_dropout,
        )
        experts = {config.scales[0]: [config.interval]} if config.interval is not None else None

        def rank_alpha(name: str, module: nn.Module) -> tuple[int, float | None]:
            kxk = isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
            if module_ranks is not None:
                return module_ranks[name], config.alpha  # alpha is overwritten by the loaded buffer
            if kxk:
                assert config.conv_rank is not None, "kxk convolutions are targeted only with a conv rank"
                return config.conv_rank, config.conv_alpha
            return config.rank, config.alpha

        self.denoiser_loras: list[TSMLoRAModule] = []
        prefix, translate = denoiser_naming(denoiser, self.family)
        if module_ranks is None:
            patterns = compile_patterns(config.denoiser_targets or self.family.denoiser_patterns(denoiser))
            conv_patterns = compile_patterns(CONV_TARGETS) if config.conv_rank else None
            candidates = find_targets(denoiser, patterns, conv_patterns)
        else:
            candidates = all_layers(denoiser)
        for path, module in candidates:
            name = lora_name(prefix, translate(path))
            if module_ranks is not None and name not in module_ranks:
                continue
            rank, alpha = rank_alpha(name, module)
            self.denoiser_loras.append(
                TSMLoRAModule(
                    name,
                    module,
                    self.context,
                    config.scales,
                    rank,
                    alpha,
                    experts=experts,
                    mixture=config.mixture_or_none,
                    **common,
                )
            )
        if not self.denoiser_loras and module_ranks is None:
            raise ValueError(f"no module of {type(denoiser).__name__} matches the targets {patterns.pattern!r}")

        self.text_encoder_loras: list[LoRAModule] = []
        for te, te_prefix in zip(text_encoders, text_encoder_prefixes(list(text_encoders))):
            if te is None:
                continue
            if module_ranks is None:
                te_patterns = config.text_encoder_targets or self.family.text_encoder_targets.get(text_encoder_kind(te))
                if not te_patterns:
                    continue
                candidates = find_targets(te, compile_patterns(te_patterns))
            else:
                candidates = all_layers(te)
            for path, module in candidates:
                name = lora_name(te_prefix, text_encoder_key_path(te, path))
                if module_ranks is not None and name not in module_ranks:
                    continue
                rank, alpha = rank_alpha(name, module)
                self.text_encoder_loras.append(LoRAModule(name, module, rank, alpha, **common))

        if (
            config.text_encoder_targets
            and module_ranks is None
            and any(te is not None for te in text_encoders)
            and not self.text_encoder_loras
        ):
            raise ValueError(f"no text-encoder module matches the targets {list(config.text_encoder_targets)}")
        names = set()
        for lora in self.all_loras:
            if lora.lora_name in names:
                raise ValueError(f"duplicate LoRA name {lora.lora_name}")
            names.add(lora.lora_name)
            self.add_module(lora.lora_name, lora)
        if module_ranks is not None:
            unmatched = sorted(set(module_ranks) - names)
            if unmatched:
                raise TSMFileError(
                    f"{len(unmatched)} module(s) of the file are not in this model (a file for another "
                    f"base model?), e.g. {unmatched[:3]}"
                )
        self.set_stage_trainable()

    @classmethod
    def from_file(
        cls,
        path: str,
        denoiser: nn.Module,
        text_encoders: Sequence[nn.Module | None] = (),
        multiplier: float = 1.0,
        family: FamilySpec | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        metadata: dict[str, str] | None = None,
        load: bool = True,
    ) -> TSMNetwork:
        """Build the network a native file describes (scales, stage, modules, ranks) and load it.

        Raises:
            TSMFileError: the file is unreadable, not a TSM file, or does not fit the model.
        """
        if tensors is None:
            tensors, metadata = load_file(path)
        info = check_tsm_file(tensors, metadata or {}, path)  # before building anything the metadata sizes
        module_ranks = lora_math.module_ranks(tensors)
        if not module_ranks:
            raise TSMFileError(f"{path}: holds no lora_down weights")
        config = TSMConfig(
            scales=info["scales"],
            stage=info["stage"],
            mixture=info["mixture"],
            interval=info["interval"],
            rank=next(iter(module_ranks.values())),
            num_train_timesteps=info["num_train_timesteps"],
        )
        network = cls(config, denoiser, text_encoders, family=family, multiplier=multiplier, module_ranks=module_ranks)
        if load:
            network.load_weights(path, tensors, metadata)
        return network

    # -- structure --------------------------------------------------------------------------
    @property
    def all_loras(self) -> list[LoRAModule | TSMLoRAModule]:
        return [*self.text_encoder_loras, *self.denoiser_loras]

    @property
    def num_experts(self) -> int:
        """Experts per denoiser module (all scales)."""
        return self.denoiser_loras[0].num_experts

    def is_static(self) -> bool:
        """True when the network doesn't depend on t (one expert per module, no router)."""
        return self.num_experts == 1 and self.denoiser_loras[0].router is None

    def set_stage_trainable(self) -> None:
        """Fostering trains experts and the text-encoder LoRA; assembling trains only routers."""
        assemble = self.config.stage == "assemble"
        for lora in self.denoiser_loras:
            lora.tsm.requires_grad_(not assemble)
            if lora.router is not None:
                lora.router.requires_grad_(assemble)
        for te_lora in self.text_encoder_loras:
            te_lora.requires_grad_(not assemble)

    def trainable_parameters(self, text_encoder: bool = True, denoiser: bool = True) -> list[nn.Parameter]:
        loras = (self.text_encoder_loras if text_encoder else []) + (self.denoiser_loras if denoiser else [])
        return [p for lora in loras for p in lora.parameters() if p.requires_grad]

    # -- install ----------------------------------------------------------------------------
    def attach(self, denoiser: nn.Module, arg_name: str | None = None) -> None:
        """Hook the denoiser so every call sets this network's timesteps."""
        self.detach()
        self._capture = TimestepCapture(unwrap_denoiser(denoiser), self.context, self.config.timestep_scale, arg_name)

    def detach(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def apply(self, text_encoder: bool = True, denoiser: bool = True) -> None:  # type: ignore[override]  # kohya's name
        """Install the wrappers. Parts not applied are dropped from the network (as kohya does)."""
        if not text_encoder:
            self.drop_text_encoder_loras()
        if not denoiser:
            for expert_lora in self.denoiser_loras:
                delattr(self, expert_lora.lora_name)
            self.denoiser_loras = []
        for lora in self.all_loras:
            lora.apply_to()

    def drop_text_encoder_loras(self) -> None:
        for lora in self.text_encoder_loras:
            delattr(self, lora.lora_name)
        self.text_encoder_loras = []

    def remove(self) -> None:
        """Uninstall wrappers and hooks; base modules behave as before."""
        for lora in self.all_loras:
            lora.remove()
        self.detach()

    def set_timesteps(self, t: torch.Tensor | float | int | None, batch_size: int | None = None) -> None:
        """Set t by hand (0..T axis) for calling modules without the denoiser hook."""
        self.context.set(t, batch_size)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras:
            lora.multiplier = multiplier

    # -- files ------------------------------------------------------------------------------
    def tsm_metadata(self) -> dict[str, str]:
        c = self.config
        return tsm_metadata(
            c.scales,
            c.stage,
            c.mixture if c.stage == "assemble" else "asymmetric",
            c.num_train_timesteps,
            self.family.timestep_space,
            c.interval,
        )

    def save(
        self, path: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Write the native file atomically; returns the metadata written."""
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        meta = dict(metadata or {})
        meta.update(self.tsm_metadata())
        return save_file_atomic(state, path, meta)

    def expected_shapes(self) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in self.state_dict().items()}

    def load_weights(
        self, path: str, tensors: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None
    ) -> dict:
        """Load a native file saved from a network of this shape, strictly.

        Raises:
            TSMFileError: unreadable file, wrong format version, scales/stage/mixture that
                differ from this network, missing or unknown keys, wrong shapes.
        """
        if tensors is None:
            tensors, metadata = load_file(path)
        info = check_tsm_metadata(metadata or {}, path)
        check_lora_tensors(tensors, path)
        c = self.config
        mine = {
            "scales": c.scales,
            "stage": c.stage,
            "interval": c.interval,
            "num_train_timesteps": c.num_train_timesteps,
        }
        if c.stage == "assemble":
            mine["mixture"] = c.mixture
        for key, value in mine.items():
            if info[key] != value:
                raise TSMFileError(f"{path}: tsm.{key} is {info[key]!r} but this network has {value!r}")
        self._load_checked(tensors, path, self.expected_shapes())
        return info

    def load_experts(self, paths: Iterable[str]) -> None:
        """Fill the experts of an assembling network from fostered files (one per scale, or
        one per interval of a scale), and the text-encoder LoRA from the core scale's file.
        Every expert of every scale must be covered; alphas must agree across files. A core
        file without a text-encoder LoRA (fostered with the denoiser only) removes this
        network's text-encoder LoRA: there is nothing to carry into the assembled file.
        """
        if self.config.stage != "assemble":
            raise ValueError("load_experts is for tsm_stage=assemble")
        paths = list(paths)
        own = self.state_dict()
        loaded: dict[str, torch.Tensor] = {}
        core_has_text_encoder = False
        for path in paths:
            tensors, metadata = load_file(path)
            info = check_tsm_file(tensors, metadata, path)
            if info["stage"] != "foster" or len(info["scales"]) != 1:
                raise TSMFileError(
                    f"{path}: tsm_experts takes fostered files of one scale, this one is "
                    f"stage={info['stage']} scales={info['scales']}"
                )
            n = info["scales"][0]
            if n not in self.config.scales:
                raise TSMFileError(f"{path}: holds scale {n}, which is not in tsm_scales={self.config.scales}")
            if info["num_train_timesteps"] != self.config.num_train_timesteps:
                raise TSMFileError(
                    f"{path}: tsm.num_train_timesteps={info['num_train_timesteps']}, "
                    f"this network has {self.config.num_train_timesteps}"
                )
            is_core = n == self.config.scales[0]
            core_has_text_encoder |= is_core and any(k.startswith("lora_te") for k in tensors)
            for key, value in tensors.items():
                if key.startswith("lora_te") and not is_core:
                    continue  # the text-encoder LoRA comes from the core scale's file
                if ".tsm." in key:
                    if key in loaded:
                        raise TSMFileError(f"{path}: key {key!r} is also in another tsm_experts file")
                elif key.endswith(".alpha"):
                    if key in loaded and not torch.equal(loaded[key].float(), value.float()):
                        raise TSMFileError(
                            f"{path}: {key}={float(value)} differs from another tsm_experts file "
                            f"({float(loaded[key])}); experts of one module share one alpha"
                        )
                if key not in own:
                    raise TSMFileError(f"{path}: unknown key {key!r} (a file for another base model or targets?)")
                loaded[key] = value
        if not core_has_text_encoder and self.text_encoder_loras:
            logger.info(
                "tsm_experts: the core scale's file has no text-encoder LoRA (fostered with the denoiser "
                "only); the assembled network has none either"
            )
            self.drop_text_encoder_loras()
            own = self.state_dict()
        expected = {k: v.shape for k, v in own.items() if ".router." not in k}
        self._load_checked(loaded, "tsm_experts " + ",".join(paths), expected)

    def _load_checked(self, tensors, path, expected) -> None:
        check_state_dict(expected, tensors, path)
        own = self.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value.to(own[key].dtype))

    # -- merging ----------------------------------------------------------------------------
    def merge_expert(self, n: int, e: int, multiplier: float | None = None) -> None:
        """Merge expert e of scale n of every denoiser module into the base weights."""
        for lora in self.denoiser_loras:
            lora.merge_expert(n, e, multiplier)

    def merge_text_encoder(self, multiplier: float | None = None) -> None:
        for lora in self.text_encoder_loras:
            lora.merge(multiplier)

    def backup_weights(self) -> None:
        for lora in self.all_loras:
            lora.backup_weights()

    def restore_weights(self) -> None:
        for lora in self.all_loras:
            lora.restore_weights()
