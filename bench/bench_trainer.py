"""Steps/s and peak memory of the trainer (``train_tsm.py``'s ``Trainer``) vs a plain diffusers+peft LoRA loop.

Usage (from the repository root)::

    python bench/bench_trainer.py            # full run (< 5 min at 1 thread)
    python bench/bench_trainer.py --quick    # smoke run (< 1 min)

For two SD1-shaped pipelines written to a temp folder ("tiny": ``tests/tiny_models.tiny_sd_pipeline_folder``;
"mid": the same VAE/tokenizer with a UNet of block_out_channels (64, 128, 256), cross_attention_dim 256, and a
256-wide tiny CLIP), it times one optimizer step of three configurations on the same fixed, pre-made batches
(batch 4; pixels + captions; the tiny VAE has one block, so it does not downsample: tiny trains on 8x8 pixels =
8x8 latents, mid on 32x32 = 32x32 latents):

* ``peft``     baseline: the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py:
  ``unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=[to_k, to_q,
  to_v, to_out.0]))``, AdamW (lr 1e-4, wd 1e-2) on the LoRA params, VAE encode + text-encoder forward per batch
  (captions pre-tokenized, as the example's dataset transform does), ``DDPMScheduler.add_noise``, epsilon MSE,
  backward, clip_grad_norm 1.0, step, constant LR schedule, ``loss.item()``.
* ``vanilla``  ``Trainer(TrainConfig(tsm_stage="vanilla"))``: same rank/alpha/targets/optimizer.
* ``tsm8``     ``Trainer(TrainConfig(tsm_scales="8"))``: TSM fostering, 8 experts, per-sample routing.

Ours calls ``trainer.train_step([batch])`` directly (no data loading, no saving, no logging). Timing: warm-up,
then the configurations are interleaved round-robin (order reversed every other round) and the median step time
per configuration is reported as steps/s with its ratio to ``peft`` (> 1: faster than peft).

Peak memory (CPU): each (size, config) runs in a fresh spawned process at 1 thread; peak RSS reached during the
steps minus the RSS after everything is built (helpers of ``bench_network.py``: VmHWM after a ``clear_refs``
reset, else ``ru_maxrss``). Optimizer state and gradients are allocated inside the measured steps for all three.
On CUDA: ``max_memory_allocated`` during the steps minus the allocation before them.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from measure import interleaved_samples, peak_rss_increase  # noqa: E402

BATCH = 4
N_BATCHES = 4  # distinct pre-made batches, cycled
SEED = 0
CONFIGS = ("peft", "vanilla", "tsm8")
SIZES = ("tiny", "mid")
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


# ---------------------------------------------------------------------------------------
# models and data
def write_folder(size: str, root: str) -> str:
    """A local SD1 pipeline folder for ``size``; returns its path."""
    from tests.tiny_models import tiny_clip, tiny_sd_pipeline_folder

    folder = os.path.join(root, size)
    tiny_sd_pipeline_folder(folder, seed=SEED)
    if size == "mid":
        from diffusers import UNet2DConditionModel

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
        unet.save_pretrained(os.path.join(folder, "unet"))
        tiny_clip(hidden_size=256, seed=SEED).save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def pixel_size(folder: str) -> int:
    """Pixels per side so that the latents match the UNet's sample_size (VAE factor 2**(blocks-1))."""
    import json

    with open(os.path.join(folder, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    with open(os.path.join(folder, "unet", "config.json")) as f:
        return json.load(f)["sample_size"] * factor


def make_batches(folder: str) -> list[dict]:
    g = torch.Generator().manual_seed(SEED + 2)
    size = pixel_size(folder)
    letters = "abcdefghijklmnopqrstuvwxyz"
    batches = []
    for _b in range(N_BATCHES):
        pixels = torch.rand(BATCH, 3, size, size, generator=g) * 2 - 1
        captions = []
        for _ in range(BATCH):
            idx = torch.randint(0, len(letters), (12,), generator=g).tolist()
            captions.append(" ".join("".join(letters[i] for i in idx[k : k + 4]) for k in range(0, 12, 4)))
        batches.append({"pixels": pixels, "captions": captions})
    return batches


def build(size: str, config: str, folder: str, device: torch.device):
    """(step, keep) for one configuration: ``step()`` runs one optimizer step on the next batch."""
    from tsm_trainer.families import StableDiffusionFamily

    batches = make_batches(folder)
    family = StableDiffusionFamily()
    c = family.load(folder)
    counter = [0]

    if config == "peft":
        import torch.nn.functional as F
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        unet, vae, te, scheduler = c.denoiser, c.vae, c.text_encoders[0], c.noise_scheduler
        tok = c.tokenizers[0]
        for m in (unet, vae, te):
            m.requires_grad_(False)
            m.to(device)
        torch.manual_seed(SEED + 1)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
        params = [p for p in unet.parameters() if p.requires_grad]
        assert params
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer)
        for b in batches:  # the example tokenizes in the dataset transform, not in the step
            b["input_ids"] = tok(
                b["captions"],
                max_length=tok.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids
        unet.train()

        def step():
            batch = batches[counter[0] % len(batches)]
            counter[0] += 1
            latents = vae.encode(batch["pixels"].to(device)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
            ).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = te(batch["input_ids"].to(device), return_dict=False)[0]
            target = noise  # epsilon
            pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            return loss.item()

        return step, (c, optimizer)

    from tsm_trainer.training.config import TrainConfig
    from tsm_trainer.training.loop import Trainer

    out = tempfile.mkdtemp(prefix="bench_trainer_out_")
    if config == "vanilla":
        cfg = TrainConfig(
            pretrained_model_name_or_path=folder,
            tsm_stage="vanilla",
            network_dim=4,
            network_alpha=4.0,
            network_train_unet_only=True,
            output_dir=out,
            seed=SEED,
        )
    elif config == "tsm8":
        cfg = TrainConfig(
            pretrained_model_name_or_path=folder,
            tsm_stage="foster",
            tsm_scales="8",
            network_dim=4,
            network_alpha=4.0,
            network_train_unet_only=True,
            output_dir=out,
            seed=SEED,
        )
    else:
        raise ValueError(config)
    trainer = Trainer(
        cfg,
        family,
        c,
        make_batches=lambda epoch: batches,
        batch_size=BATCH,
        log=lambda *a: None,
        batches_per_epoch=len(batches),
    )

    def step():
        batch = batches[counter[0] % len(batches)]
        counter[0] += 1
        return trainer.train_step([batch])

    return step, trainer


def quiet() -> None:
    """No progress bars / info logs from loading and saving the pipelines."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------
# time
def time_size(
    size: str,
    folder: str,
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: int,
    budget_s: float,
    min_repeats: int = 3,
) -> dict[str, dict]:
    built = {c: build(size, c, folder, device) for c in CONFIGS}
    samples = interleaved_samples(
        {c: built[c][0] for c in CONFIGS}, device, warmup, repeats, inner, budget_s, min_repeats
    )
    info = {c: dict(s=statistics.median(v), min_s=min(v), max_s=max(v), repeats=len(v)) for c, v in samples.items()}
    del built
    gc.collect()
    return info


# ---------------------------------------------------------------------------------------
# memory
def mem_child(size: str, config: str, folder: str, steps: int, queue) -> None:
    """Fresh (spawned) process: peak RSS increase during ``steps`` optimizer steps."""
    try:
        torch.set_num_threads(1)
        quiet()
        step, keep = build(size, config, folder, torch.device("cpu"))
        gc.collect()
        delta, how = peak_rss_increase(step, steps)
        queue.put((delta, how))
    except BaseException as exc:
        queue.put((None, repr(exc)))


def mem_cpu(folders: dict[str, str], steps: int) -> dict[tuple[str, str], tuple[int | None, str]]:
    """One spawned process at a time (the benchmark runs on one core)."""
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    results = {}
    for s, folder in folders.items():
        for c in CONFIGS:
            q = ctx.Queue()
            p = ctx.Process(target=mem_child, args=(s, c, folder, steps, q), daemon=True)
            p.start()
            try:
                results[(s, c)] = q.get(timeout=300)
            except queue_mod.Empty:
                results[(s, c)] = (None, f"no result (exit code {p.exitcode})")
            p.join(timeout=30)
    return results


def mem_cuda(
    folders: dict[str, str], steps: int, device: torch.device
) -> dict[tuple[str, str], tuple[int | None, str]]:
    results = {}
    for s, folder in folders.items():
        for c in CONFIGS:
            step, keep = build(s, c, folder, device)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
            results[(s, c)] = (torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated")
            del step, keep
            gc.collect()
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run, < 1 min")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma list of tiny,mid")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    quiet()
    device = torch.device(args.device)
    sizes = [s for s in args.sizes.split(",") if s]
    # (warmup rounds, repeats, steps per sample, time budget of the repeats in s) per size
    if args.quick:
        plan = {"tiny": (2, 6, 2, 5.0), "mid": (1, 3, 1, 10.0)}
    else:
        plan = {"tiny": (3, 20, 5, 30.0), "mid": (2, 12, 1, 100.0)}
    if device.type == "cuda":
        plan = {s: (w + 3, r * 2, i * 5, b) for s, (w, r, i, b) in plan.items()}
    mem_steps = 2 if args.quick else 3

    import diffusers
    import peft

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"python {platform.python_version()}, device {device}, threads {args.threads}, batch {BATCH}"
    )
    t_start = time.time()
    root = tempfile.mkdtemp(prefix="bench_trainer_")
    folders = {s: write_folder(s, root) for s in sizes}
    timing: dict[str, dict] = {}
    for s in sizes:
        w, r, i, budget = plan[s]
        t0 = time.time()
        timing[s] = time_size(s, folders[s], device, w, r, i, budget)
        base = timing[s]["peft"]["s"]
        px = pixel_size(folders[s])
        print(
            f"\n[{s}] {px}x{px} pixels, warmup {w}, {timing[s]['peft']['repeats']} interleaved repeats x {i} "
            f"step(s), {time.time() - t0:.1f}s"
        )
        for c in CONFIGS:
            d = timing[s][c]
            print(
                f"  {c:8s} {d['s'] * 1e3:9.2f} ms/step (min {d['min_s'] * 1e3:8.2f}, max {d['max_s'] * 1e3:8.2f})  "
                f"{1 / d['s']:7.2f} steps/s  {base / d['s']:6.3f}x peft"
            )

    mem: dict = {}
    if not args.no_mem:
        t0 = time.time()
        mem_folders = {s: f for s, f in folders.items() if not (args.quick and s == "tiny" and "mid" in folders)}
        mem = mem_cuda(mem_folders, mem_steps, device) if device.type == "cuda" else mem_cpu(mem_folders, mem_steps)
        print(f"\npeak memory increase ({mem_steps} steps, {time.time() - t0:.1f}s):")
        for s in mem_folders:
            for c in CONFIGS:
                delta, how = mem[(s, c)]
                print(
                    f"  [{s}] {c:8s} " + (f"failed: {how}" if delta is None else f"{delta / 2**20:9.1f} MiB  ({how})")
                )

    def mem_cell(s: str, c: str) -> str:
        base, cur = mem.get((s, "peft"), (None, ""))[0], mem.get((s, c), (None, ""))[0]
        return f"{cur / base:.3f}x ({cur / 2**20:.0f} MiB)" if base and cur is not None else "n/a"

    print(
        "\n| config | "
        + " | ".join(f"{s} steps/s | ratio" for s in sizes)
        + " | "
        + " | ".join(f"{s} peak mem ratio" for s in sizes)
        + " |"
    )
    print("|---|" + "---:|---:|" * len(sizes) + "---:|" * len(sizes))
    for c in CONFIGS:
        cells = []
        for s in sizes:
            d = timing[s][c]
            cells += [f"{1 / d['s']:.2f}", f"{timing[s]['peft']['s'] / d['s']:.3f}x"]
        cells += [mem_cell(s, c) for s in sizes]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(
        "\nratio: steps/s relative to peft (> 1 is faster); peak mem ratio: peak RSS increase relative to peft "
        "(< 1 is less)"
    )
    print(f"\ntotal {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
