"""Step-time and memory benchmark of TSM LoRA vs vanilla LoRA on a diffusers UNet.

Usage (from the repository root)::

    python bench/bench_network.py            # full run (< 5 min on 2 CPU cores)
    python bench/bench_network.py --quick    # smoke run (< 1 min)

For two UNet sizes ("tiny", like ``tests/tiny_models.tiny_unet``; "mid", a mid-size
SD-shaped UNet) it times one training step (forward, ``loss = out.pow(2).mean()``,
backward) of four configurations that wrap the same frozen base weights:

* ``vanilla``     ``TSMConfig(scales=[1])``: one expert, i.e. exactly vanilla LoRA.
* ``s1_one_t``    stage 1, n=8, every sample of the batch has the same t.
* ``s1_mixed_t``  stage 1, n=8, batch of 4 with t in 4 different intervals.
* ``s2_mixed_t``  stage 2, ``scales=[8, 1]``, ``stage="assemble"``, mixed t (experts
  frozen with nonzero ``lora_up``, routers train).

Timing: warm-up, then the configurations are interleaved round-robin over several repeats
(so that load on a shared machine hits them all alike) and the median per configuration
is reported with its ratio to vanilla.

Memory, two measures:

* ``peak``: on CUDA, ``max_memory_allocated`` during the steps minus the allocation before
  them. On CPU each configuration runs in a fresh process (multiprocessing spawn); the
  peak RSS reached during the steps minus the RSS after the model is built (VmHWM after a
  ``clear_refs`` reset where Linux allows it, else ``ru_maxrss`` difference).
* ``saved``: bytes of the distinct tensor storages autograd saves for backward in one
  step (deterministic; the part of the peak the LoRA wrappers can change).

Targets (from the issue): s1_one_t <= 1.05x vanilla, s1_mixed_t <= 1.15x,
s2_mixed_t <= 1.25x, peak memory <= 1.10x.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from measure import interleaved_samples, peak_rss_increase  # noqa: E402

BATCH = 4
SEED = 0
ONE_T = [300.0] * BATCH  # all in interval 2 of n=8
MIXED_T = [50.0, 300.0, 550.0, 800.0]  # intervals 0, 2, 4, 6 of n=8

CONFIGS = ("vanilla", "s1_one_t", "s1_mixed_t", "s2_mixed_t")
TARGETS = {"vanilla": 1.0, "s1_one_t": 1.05, "s1_mixed_t": 1.15, "s2_mixed_t": 1.25}
MEM_TARGET = 1.10
SIZES = ("tiny", "mid")


# ---------------------------------------------------------------------------------------
# models
def build_unet(size: str):
    """A randomly initialised UNet2DConditionModel; identical base weights for a given size."""
    from diffusers import UNet2DConditionModel

    if size == "tiny":
        from tests.tiny_models import tiny_unet

        unet = tiny_unet(cross_attention_dim=16, seed=SEED)
        spec = dict(sample=8, channels=4, seq=8, ctx_dim=16)
    elif size == "mid":
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(64, 128, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=256,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        spec = dict(sample=32, channels=4, seq=77, ctx_dim=256)
    else:
        raise ValueError(size)
    unet.requires_grad_(False)
    unet.train()
    return unet, spec


def build(size: str, config: str, device: torch.device):
    """(unet, network, step) for one configuration."""
    from tsm_trainer import TSMConfig, TSMNetwork

    unet, spec = build_unet(size)
    unet.to(device)
    torch.manual_seed(SEED + 1)  # same LoRA init draw order for every config
    if config == "vanilla":
        cfg, t = TSMConfig(scales=[1], rank=4, alpha=4), MIXED_T
    elif config == "s1_one_t":
        cfg, t = TSMConfig(scales=[8], rank=4, alpha=4), ONE_T
    elif config == "s1_mixed_t":
        cfg, t = TSMConfig(scales=[8], rank=4, alpha=4), MIXED_T
    elif config == "s2_mixed_t":
        cfg, t = TSMConfig(scales=[8, 1], stage="assemble", rank=4, alpha=4), MIXED_T
    else:
        raise ValueError(config)
    net = TSMNetwork(cfg, unet)
    if config == "s2_mixed_t":
        with torch.no_grad():  # fostered experts: nonzero up factors so the mixture does real work
            for lora in net.denoiser_loras:
                for experts in lora.tsm.values():
                    for pair in experts.values():
                        pair.lora_up.weight.normal_(0.0, 1e-3)
    net.to(device)
    net.apply()
    net.attach(unet)
    net.train()
    params = net.trainable_parameters()
    assert params, f"{config}: nothing to train"
    assert not any(p.requires_grad for p in unet.parameters()), "base UNet must be frozen"

    g = torch.Generator().manual_seed(SEED + 2)
    sample = torch.randn(BATCH, spec["channels"], spec["sample"], spec["sample"], generator=g).to(device)
    ctx = torch.randn(BATCH, spec["seq"], spec["ctx_dim"], generator=g).to(device)
    timesteps = torch.tensor(t, device=device)

    def step():
        out = unet(sample, timesteps, encoder_hidden_states=ctx).sample
        out.pow(2).mean().backward()
        for p in params:
            p.grad = None

    return unet, net, step, params


# ---------------------------------------------------------------------------------------
# time
def time_size(
    size: str,
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: int,
    budget_s: float = float("inf"),
    min_repeats: int = 3,
) -> dict[str, dict]:
    """Median step time per config; stops early (after ``min_repeats``) once ``budget_s`` is spent."""
    built = {c: build(size, c, device) for c in CONFIGS}
    info = {}
    for c, (_unet, net, _step, params) in built.items():
        info[c] = dict(loras=len(net.denoiser_loras), trainable=sum(p.numel() for p in params))
    samples = interleaved_samples(
        {c: built[c][2] for c in CONFIGS}, device, warmup, repeats, inner, budget_s, min_repeats
    )
    samples = {c: [v * 1e3 for v in vs] for c, vs in samples.items()}
    for c in CONFIGS:
        info[c]["ms"] = statistics.median(samples[c])
        info[c]["min_ms"] = min(samples[c])
        info[c]["max_ms"] = max(samples[c])
        info[c]["repeats"] = len(samples[c])
        info[c]["saved_mb"] = saved_bytes(built[c][0], built[c][2]) / 2**20
    del built
    gc.collect()
    return info


def saved_bytes(unet, step) -> int:
    """Bytes of distinct storages autograd saves for backward during one step."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[(t.device.type, st.data_ptr())] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


# ---------------------------------------------------------------------------------------
# memory
def mem_child(size: str, config: str, steps: int, threads: int, queue) -> None:
    """Runs in a fresh (spawned) process: peak RSS delta of ``steps`` training steps."""
    try:
        torch.set_num_threads(threads)
        unet, net, step, params = build(size, config, torch.device("cpu"))
        gc.collect()
        delta, how = peak_rss_increase(step, steps)
        queue.put((size, config, delta, how))
    except BaseException as exc:
        queue.put((size, config, None, repr(exc)))


def mem_cpu(sizes, steps: int, parallel: int) -> dict[tuple[str, str], tuple[int | None, str]]:
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    jobs = [(s, c) for s in sizes for c in CONFIGS]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    results: dict = {}
    running: dict = {}
    while jobs or running:
        while jobs and len(running) < parallel:
            s, c = jobs.pop(0)
            p = ctx.Process(target=mem_child, args=(s, c, steps, threads, queue), daemon=True)
            p.start()
            running[(s, c)] = p
        try:
            s, c, delta, how = queue.get(timeout=0.5)
            results[(s, c)] = (delta, how)
            running.pop((s, c)).join()
        except queue_mod.Empty:
            for key, p in list(running.items()):
                if not p.is_alive() and key not in results:
                    try:  # its result may still be in flight
                        s, c, delta, how = queue.get(timeout=2)
                        results[(s, c)] = (delta, how)
                        running.pop((s, c)).join()
                    except queue_mod.Empty:
                        results[key] = (None, f"child exited with code {p.exitcode}")
                        running.pop(key)
    return results


def mem_cuda(sizes, steps: int, device: torch.device) -> dict[tuple[str, str], tuple[int | None, str]]:
    results = {}
    for s in sizes:
        for c in CONFIGS:
            unet, net, step, params = build(s, c, device)
            step()  # allocator warm-up, grads allocated once
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
            results[(s, c)] = (torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated")
            del unet, net, step, params
            gc.collect()
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------
def fmt_ratio(r: float, target: float | None) -> str:
    mark = "" if target is None or r <= target else " ✗"
    return f"{r:.3f}x{mark}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run, < 1 min")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma list of tiny,mid")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for mid (default: torch's default)")
    ap.add_argument(
        "--tiny-threads",
        type=int,
        default=1,
        help="CPU threads for tiny (default 1: its ops are too small to parallelise, and OpenMP "
        "barriers on a busy machine would dominate the timing)",
    )
    args = ap.parse_args()

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    sizes = [s for s in args.sizes.split(",") if s]
    # (warmup rounds, repeats, steps per sample, time budget of the repeats in s) per size
    if args.quick:
        plan = {"tiny": (2, 8, 3, 8.0), "mid": (1, 3, 1, 15.0)}
    else:
        plan = {"tiny": (3, 25, 5, 40.0), "mid": (2, 15, 1, 120.0)}
    if device.type == "cuda":
        plan = {s: (w + 3, r * 2, i * 5, b) for s, (w, r, i, b) in plan.items()}
    mem_steps = 2 if args.quick else 3

    import diffusers

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}, "
        f"device {device}, cpus {os.cpu_count()}, batch {BATCH}"
    )
    t_start = time.time()
    timing: dict[str, dict] = {}
    default_threads = args.threads or torch.get_num_threads()
    for s in sizes:
        w, r, i, budget = plan[s]
        threads = args.tiny_threads if s == "tiny" else default_threads
        torch.set_num_threads(threads)
        t0 = time.time()
        timing[s] = time_size(s, device, w, r, i, budget)
        v = timing[s]["vanilla"]["ms"]
        r = timing[s]["vanilla"]["repeats"]
        print(
            f"\n[{s}] {threads} thread(s), warmup {w}, {r} interleaved repeats x {i} step(s), {time.time() - t0:.1f}s"
        )
        for c in CONFIGS:
            d = timing[s][c]
            print(
                f"  {c:11s} {d['ms']:9.2f} ms (min {d['min_ms']:8.2f}, max {d['max_ms']:8.2f})  {d['ms'] / v:6.3f}x  "
                f"loras {d['loras']:3d}  trainable {d['trainable']:8d}  saved-for-backward {d['saved_mb']:8.2f} MiB"
            )

    mem: dict = {}
    if not args.no_mem:
        t0 = time.time()
        mem_sizes = [s for s in sizes if not (args.quick and s == "tiny" and "mid" in sizes)]
        if device.type == "cuda":
            mem = mem_cuda(mem_sizes, mem_steps, device)
        else:
            mem = mem_cpu(mem_sizes, mem_steps, parallel=2)
        print(f"\npeak memory delta ({mem_steps} steps, {time.time() - t0:.1f}s):")
        for s in mem_sizes:
            for c in CONFIGS:
                delta, how = mem[(s, c)]
                if delta is None:
                    print(f"  [{s}] {c:11s} failed: {how}")
                else:
                    print(f"  [{s}] {c:11s} {delta / 2**20:9.1f} MiB  ({how})")

    # Markdown table
    print(
        "\n| config | "
        + " | ".join(f"{s} ms | ratio" for s in sizes)
        + " | "
        + " | ".join(f"{s} peak mem ratio" for s in sizes)
        + " | "
        + " | ".join(f"{s} saved ratio" for s in sizes)
        + " | target |"
    )
    print("|---|" + "---:|---:|" * len(sizes) + "---:|" * (2 * len(sizes)) + "---:|")
    for c in CONFIGS:
        cells = []
        for s in sizes:
            d = timing[s][c]
            cells += [f"{d['ms']:.2f}", fmt_ratio(d["ms"] / timing[s]["vanilla"]["ms"], TARGETS[c])]
        for s in sizes:
            dv, dc = mem.get((s, "vanilla"), (None, "")), mem.get((s, c), (None, ""))
            cells.append(fmt_ratio(dc[0] / dv[0], MEM_TARGET) if dv[0] and dc[0] is not None else "n/a")
        for s in sizes:
            cells.append(fmt_ratio(timing[s][c]["saved_mb"] / timing[s]["vanilla"]["saved_mb"], MEM_TARGET))
        print(f"| {c} | " + " | ".join(cells) + f" | time <= {TARGETS[c]:.2f}x, mem <= {MEM_TARGET:.2f}x |")
    print(f"\ntotal {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
