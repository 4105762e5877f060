"""Measurement helpers shared by the benchmarks: interleaved step timing and peak-RSS deltas."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: int,
    budget_s: float = float("inf"),
    min_repeats: int = 3,
) -> dict[str, list[float]]:
    """Seconds per step of each config, measured round-robin (alternating order each round, so no
    config keeps a fixed position); stops early, after ``min_repeats``, once ``budget_s`` is spent."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync(device)
    names = tuple(steps)
    samples: dict[str, list[float]] = {c: [] for c in names}
    t_begin = time.perf_counter()
    for r in range(repeats):
        if r >= min_repeats and time.perf_counter() - t_begin > budget_s:
            break
        for c in names if r % 2 == 0 else tuple(reversed(names)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                steps[c]()
            sync(device)
            samples[c].append((time.perf_counter() - t0) / inner)
    return samples


def _rss_kib() -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in KiB from /proc, or (None, None)."""
    rss = hwm = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def peak_rss_increase(step: Callable[[], object], steps: int) -> tuple[int, str]:
    """(bytes, method): how far the process's peak RSS rises above its current RSS while running
    ``step`` ``steps`` times. Uses VmHWM after a reset where Linux allows it, else ru_maxrss
    (which only sees a rise above the process's earlier peak). Call in a fresh process."""
    base_ru = _ru_maxrss_kib()
    rss0, _ = _rss_kib()
    reset = _reset_hwm()
    _, hwm_after_reset = _rss_kib()
    reset = reset and hwm_after_reset is not None and rss0 is not None and hwm_after_reset <= rss0 + 1024
    for _ in range(steps):
        step()
    if reset:
        _, hwm = _rss_kib()
        return (hwm - rss0) * 1024, "VmHWM"
    return (_ru_maxrss_kib() - base_ru) * 1024, "ru_maxrss"
