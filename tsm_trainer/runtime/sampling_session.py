"""One sampling-time policy for every UI adapter (A1111, Forge, ComfyUI): merge or online,
backup and exact restore, and how errors surface. No UI import.

Policy
------
* **Merge or online** (:func:`choose_path`): a file is merged (:class:`~tsm_trainer.runtime.online.ExpertSwitcher`,
  one weight write per expert crossed) only when it is a fostered file with one scale and no
  router, its weights are plain fp32/fp16/bf16 tensors (:func:`weights_writable`), ``mode`` is not
  ``online`` and no other file of the session already merges (two merges would overwrite each
  other). A1111 asks the same function, but its Lora extension does the merging (``layers=None``).
  Everything else runs online (:class:`~tsm_trainer.runtime.online.OnlineTSM`, no weight write).
  ``mode=merge`` where merging is impossible is an error naming the reason.
* **Mixed-interval batches**: when the samples of one call fall in different experts, the merged
  file is restored and re-applied online for the rest of the run (exact, slower); the switch is
  recorded in :attr:`SamplingSession.notices` for the UI's output info. Never silent.
* **Errors**: any other exception while switching experts restores every file of the session
  (weights bit for bit, layer forwards unwrapped) *before* it propagates, as
  :class:`TSMSamplingError` naming the file and t; the session is then closed and refuses further
  calls instead of sampling on half-applied weights.
* **Restore** (:meth:`SamplingSession.restore`) is idempotent and restores every file even when one
  of them fails, re-raising the first failure afterwards.
* **Devices**: t is moved to the CPU before any float64 arithmetic (MPS has no float64,
  :func:`~tsm_trainer.runtime.online.cpu_timesteps`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tsm_trainer.core.file_format import TSMFileError, check_tsm_metadata
from tsm_trainer.runtime.online import ExpertSwitcher, MixedExpertsError, OnlineTSM, cpu_timesteps, merge_blocker

MODES = ("auto", "merge", "online")
WRITABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TSMSamplingError(RuntimeError):
    """A TSM file failed while sampling; the model's weights were restored before it was raised."""


def weights_writable(layer: nn.Module) -> bool:
    """False for weights a merge must not write: bnb 4-bit (``bnb_quantized``), GGUF (``gguf_cls``),
    fp8 or any other non fp32/fp16/bf16 storage, or a layer without a weight. A slice of a fused layer
    (an adapter's object with ``fused_parent``) is judged by that layer."""
    w = getattr(getattr(layer, "fused_parent", layer), "weight", None)
    return (
        isinstance(w, torch.Tensor)
        and not hasattr(w, "bnb_quantized")
        and getattr(w, "gguf_cls", None) is None
        and w.dtype in WRITABLE_DTYPES
    )


def choose_path(
    metadata: Mapping[str, str],
    layers: Mapping[str, nn.Module] | None,
    *,
    mode: str = "auto",
    merge_taken: bool = False,
    path: str = "<file>",
) -> tuple[bool, str]:
    """Whether a file merges, and why not when it runs online.

    Args:
        layers: the layers a merge would write; None when the host writes the weights itself
            (A1111's Lora extension: its own backups and fp8 handling, and it sums the deltas of
            every loaded network, so neither the storage nor another merging file matters).
    Returns:
        ``(merge, reason)``; ``reason`` is "" when merging.
    Raises:
        TSMFileError: ``mode`` unknown, or ``mode="merge"`` where merging is impossible.
    """
    if mode not in MODES:
        raise TSMFileError(f"{path}: mode={mode!r}, expected one of {MODES}")
    info = check_tsm_metadata(metadata, path)
    reason = merge_blocker(info)
    if not reason and layers is not None and any(not weights_writable(m) for m in layers.values()):
        reason = "quantized weights (bnb/GGUF/fp8) are never written, so the file runs online"
    elif not reason and merge_taken:
        reason = "another TSM file already merges into these weights, so this one runs online"
    if mode == "merge" and reason:
        raise TSMFileError(f"{path}: mode=merge is impossible: {reason}; use mode=auto or mode=online")
    if mode == "online":
        reason = reason or "mode=online"
    return not reason, reason


@dataclass
class SessionFile:
    """One TSM file for a session: its content and the layers (by kohya name) it applies to."""

    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str]
    layers: Mapping[str, nn.Module]
    multiplier: float = 1.0
    path: str = "<file>"
    mode: str = "auto"


@dataclass
class FileRun:
    """A file's state in a session: its runtime, the path it took, and what happened."""

    file: SessionFile
    runtime: object
    merge: bool
    reason: str
    calls: int = 0
    restored: bool = False
    history: list = field(default_factory=list)  # the merged expert at each call (None online)

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def merges(self) -> int:
        return self.runtime.merges if self.merge else 0

    @property
    def active(self) -> int | None:
        return self.runtime.active if self.merge else None


def _online(f: SessionFile):
    return OnlineTSM(f.tensors, f.metadata, f.layers, f.multiplier, f.path)


def _merged(f: SessionFile):
    return ExpertSwitcher(f.tensors, f.metadata, f.layers, f.multiplier, f.path)


class SamplingSession:
    """The TSM files applied to one model for one sampling run.

    Args:
        files: in order; the first mergeable file merges, the rest run online.
        make_online, make_merged: ``SessionFile -> runtime`` (``set_timestep``/``restore``); adapters
            whose layers need a view (Forge's Linear classes) pass their own.
        weight_writes: context manager factory around every weight write and restore (Forge's weights
            are inference tensors: ``torch.inference_mode``).
    Iterating a session yields its :class:`FileRun` objects.
    """

    def __init__(
        self,
        files: Sequence[SessionFile],
        *,
        make_online: Callable = _online,
        make_merged: Callable = _merged,
        weight_writes: Callable = contextlib.nullcontext,
    ):
        self.make_online = make_online
        self.weight_writes = weight_writes
        self.runs: list[FileRun] = []
        self.notices: list[str] = []
        self.calls = 0
        self.closed = False
        try:
            for f in files:
                merge, reason = choose_path(
                    f.metadata, f.layers, mode=f.mode, merge_taken=any(r.merge for r in self.runs), path=f.path
                )
                runtime = make_merged(f) if merge else make_online(f)
                self.runs.append(FileRun(f, runtime, merge, reason))
        except BaseException:
            self.restore()
            raise

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def set_timestep(self, t: torch.Tensor | float, batch_size: int | None = None) -> None:
        """Apply the experts of t (the timestep the UNet receives, 0..T) before a denoiser call.

        Raises:
            TSMSamplingError: after restoring every file, when applying failed or the session was
                closed by an earlier failure.
        """
        if self.closed:
            raise TSMSamplingError(
                "[TSM] this sampling session was stopped by an earlier error; "
                "the model runs without TSM until the next generation"
            )
        if any(r.restored for r in self.runs):
            raise TSMSamplingError("[TSM] this sampling session already ended (weights restored); start a new one")
        self.calls += 1
        t = cpu_timesteps(t)
        run = None
        try:
            for run in self.runs:
                run.calls += 1
                if run.merge:
                    try:
                        with self.weight_writes():
                            run.runtime.set_timestep(t)
                    except MixedExpertsError:
                        self._go_online(run)
                if not run.merge:
                    run.runtime.set_timestep(t, batch_size)
                run.history.append(run.active)
        except BaseException as e:
            self.restore()
            self.closed = True
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            at = f"t={t.tolist()[:4]}"
            what = (
                str(e)
                if run is not None and run.path in str(e)
                else f"{run.path if run else 'TSM'}: {type(e).__name__}: {e}"
            )
            raise TSMSamplingError(f"[TSM] {what} (at {at}; the base weights were restored; generation stopped)") from e

    def _go_online(self, run: FileRun) -> None:
        with self.weight_writes():
            run.runtime.restore()
        run.runtime, run.merge = self.make_online(run.file), False
        run.reason = "samples of one call fell in different experts"
        self.notices.append(
            f"{run.path}: samples of one denoiser call fell in different experts; "
            "switched from merged weights to the online path (exact, slower) for the rest of the run"
        )

    def restore(self) -> None:
        """Undo every file (weights bit for bit, forwards unwrapped); idempotent. Tries all files and
        re-raises the first failure afterwards."""
        first = None
        for run in self.runs:
            if run.restored:
                continue
            run.restored = True
            try:
                with self.weight_writes():
                    run.runtime.restore()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False
