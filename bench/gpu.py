"""GPU benchmark: step time and peak VRAM of LoRA training at full size, vanilla vs TSM vs peft.

Usage (from the repository root)::

    python bench/gpu.py --out bench_gpu.json          # CUDA: full-size SD1.5 at 512 px and SDXL at 1024 px
    python bench/gpu.py --models sd15 --budget_s 500  # one model, stop cleanly after 500 s of measuring
    python bench/gpu.py --quick                       # CPU smoke run: tiny UNets, a few steps (CI)

Models are random-init diffusers ``UNet2DConditionModel`` s with the released SD1.5 / SDXL UNet configs
(written below: nothing is downloaded) and random-init CLIP text encoders of the real sizes (CLIP-L;
SDXL: CLIP-L + OpenCLIP bigG), frozen. One training step, as the trainer's with cached latents: the
text encoders' forward (no grad), ``DDPMScheduler.add_noise``, the UNet forward under autocast,
epsilon MSE, backward (GradScaler for fp16), gradient clipping at 1.0, the optimizer step. The frozen
weights are cast to the autocast dtype (``--base_dtype half``, as kohya's sd-scripts and the diffusers
examples do) or kept in fp32 (``--base_dtype fp32``); LoRA weights stay fp32. Configurations, on the
same base weights and batch:

* ``vanilla``: ``TSMNetwork(TSMConfig(scales=[1]))``, rank 4, the attention projections (as the trainer);
* ``tsm8``: stage 1, n = 8 experts, the batch's timesteps spread over the intervals (mixed t);
* ``stage2``: stage 2 ``scales=[8, 1]``, ``stage="assemble"`` (experts frozen, nonzero; routers train);
* ``peft``: the same step through a plain peft loop (``unet.add_adapter(LoraConfig(r=4, lora_alpha=4,
  target_modules=[to_q, to_k, to_v, to_out.0]))``, as diffusers' train_text_to_image_lora.py).

For every setting (model x batch x precision x optimizer x checkpointing x attention x base dtype) each
configuration runs warm-up steps then timed steps (median; ``bench/measure.py``); peak VRAM is
``torch.cuda.max_memory_allocated`` over its steps (absolute: weights, optimizer state, activations) and
``max_memory_reserved`` (what the allocator holds; the CUDA context, ~0.3-0.5 GiB, comes on top). Both are
given as ratios to ``vanilla`` of the same setting. Prints a markdown table and the issue's targets, and
writes JSON (rewritten after every setting, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from measure import interleaved_samples, sync  # noqa: E402

CONFIGS = ("vanilla", "tsm8", "stage2", "peft")
RANK = 4
SEED = 0
GIB = 2**30

_SD15_UNET = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
_SDXL_UNET = dict(
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
_CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
_TINY_CLIP = dict(vocab_size=100, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)

# name -> UNet config, text encoders (CLIPTextConfig kwargs), latent side, pixel side, SDXL conditioning
MODELS = {
    "sd15": dict(unet=_SD15_UNET, text=[_CLIP_L], latent=64, pixels=512, xl=False),
    "sdxl": dict(unet=_SDXL_UNET, text=[_CLIP_L, _CLIP_BIGG], latent=128, pixels=1024, xl=True),
    # --quick: the same structure at toy widths
    "sd15-tiny": dict(
        unet=dict(
            sample_size=8,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
        ),
        text=[dict(_TINY_CLIP, hidden_size=16, projection_dim=16)],
        latent=8,
        pixels=64,
        xl=False,
    ),
    "sdxl-tiny": dict(
        unet=dict(
            sample_size=8,
            layers_per_block=2,
            block_out_channels=(8, 16, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=4 * 6 + 8,
        ),
        text=[dict(_TINY_CLIP, hidden_size=8, projection_dim=8)] * 2,
        latent=8,
        pixels=64,
        xl=True,
    ),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# The targets: (name, limit). Ratios are to vanilla of the same setting.
TARGETS = (
    ("TSM stage 1 (n=8, mixed t) step time vs vanilla", 1.05),
    ("TSM stage 1 (n=8, mixed t) peak VRAM vs vanilla", 1.10),
    ("TSM stage 2 [8,1] step time vs vanilla", 1.25),
    ("SD1.5 512 px batch 1, AdamW8bit + checkpointing: peak reserved GiB", 8.0),
    ("SDXL 1024 px batch 1, AdamW8bit + checkpointing: peak reserved GiB", 12.0),
)


# ---------------------------------------------------------------------------------------
# models and inputs
def build_models(name: str, device: torch.device):
    """(unet, text_encoders): random init with fixed seeds, frozen, in fp32 on ``device``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = MODELS[name]
    torch.manual_seed(SEED)
    with torch.device(device):  # initialise in place: a CPU init of SDXL's 2.6 B parameters takes minutes
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        encoders = []
        for i, cfg in enumerate(spec["text"]):
            cls = CLIPTextModelWithProjection if spec["xl"] and i == 1 else CLIPTextModel
            encoders.append(
                cls(CLIPTextConfig(max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, **cfg))
            )
    for m in (unet, *encoders):
        m.requires_grad_(False)
    for m in encoders:
        m.eval()
    unet.train()
    return unet, encoders


def make_inputs(name: str, batch: int, device: torch.device) -> dict:
    """Fixed latents, noise, token ids and timesteps; t spread over the 8 intervals of n = 8."""
    spec = MODELS[name]
    g = torch.Generator().manual_seed(SEED + 2)
    side = spec["latent"]
    vocab = spec["text"][0]["vocab_size"]
    return dict(
        latents=torch.randn(batch, 4, side, side, generator=g).to(device),
        noise=torch.randn(batch, 4, side, side, generator=g).to(device),
        input_ids=torch.randint(3, vocab, (batch, 77), generator=g).to(device),
        timesteps=torch.tensor([(k * 8 // batch) * 125 + 60 for k in range(batch)], device=device),
        time_ids=torch.tensor(
            [[spec["pixels"]] * 2 + [0, 0] + [spec["pixels"]] * 2] * batch, dtype=torch.float32, device=device
        ),
    )


def encode_text(name: str, encoders, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(encoder_hidden_states, added_cond_kwargs) as SD1 / SDXL pipelines build them."""
    with torch.no_grad():
        if not MODELS[name]["xl"]:
            return encoders[0](input_ids)[0], {}
        out1 = encoders[0](input_ids, output_hidden_states=True)
        out2 = encoders[1](input_ids, output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return context, {"text_embeds": out2.text_embeds}


# ---------------------------------------------------------------------------------------
# configurations
def wrap(config: str, unet, device: torch.device):
    """Install one configuration's LoRA on ``unet``; returns (trainable params, undo)."""
    if config == "peft":
        from peft import LoraConfig

        torch.manual_seed(SEED + 1)
        unet.add_adapter(
            LoraConfig(
                r=RANK,
                lora_alpha=RANK,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            ),
            adapter_name="bench",
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # fp32 LoRA weights on half base weights (diffusers' cast_training_params)
            p.data = p.data.float()
        return params, unet.unload_lora  # back to the plain nn.Linear modules

    from tsm_trainer import TSMConfig, TSMNetwork

    scales, stage = {"vanilla": ([1], "foster"), "tsm8": ([8], "foster"), "stage2": ([8, 1], "assemble")}[config]
    torch.manual_seed(SEED + 1)
    net = TSMNetwork(TSMConfig(scales=scales, stage=stage, rank=RANK, alpha=RANK), unet)
    if stage == "assemble":
        with torch.no_grad():  # fostered experts: nonzero up factors, so the mixture does real work
            for lora in net.denoiser_loras:
                for experts in lora.tsm.values():
                    for pair in experts.values():
                        pair.lora_up.weight.normal_(0.0, 1e-3)
    net.to(device=device, dtype=torch.float32)
    net.apply()
    net.attach(unet)
    net.train()
    return net.trainable_parameters(), net.remove


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2)
    try:  # the trainer's choice (one kernel for many small tensors)
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)


def set_attention(unet, attention: str) -> None:
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def make_step(name: str, unet, encoders, inputs: dict, params, optimizer, precision: str, device: torch.device):
    """One optimizer step; returns the loss tensor."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None

    def step():
        with torch.autocast(device.type, dtype=dtype):
            context, added = encode_text(name, encoders, inputs["input_ids"])
        if added:
            added["time_ids"] = inputs["time_ids"]
        noisy = scheduler.add_noise(inputs["latents"], inputs["noise"], inputs["timesteps"])
        with torch.autocast(device.type, dtype=dtype):
            pred = unet(noisy, inputs["timesteps"], context, added_cond_kwargs=added or None).sample
        loss = F.mse_loss(pred.float(), inputs["noise"].float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------
# measuring
def measure(setting: dict, config: str, unet, encoders, device: torch.device, warmup: int, steps: int) -> dict:
    """Step time (median of ``steps`` after ``warmup``) and peak memory of one configuration."""
    row = dict(setting, config=config, device=str(device))
    params, undo = wrap(config, unet, device)
    try:
        optimizer = make_optimizer(setting["optimizer"], params)
        inputs = make_inputs(setting["model"], setting["batch"], device)
        step = make_step(setting["model"], unet, encoders, inputs, params, optimizer, setting["precision"], device)
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        row["first_loss"] = float(step())  # the LoRA starts at zero (stage 2: nonzero experts)
        samples = interleaved_samples({config: step}, device, max(warmup - 1, 0), steps, 1)[config]
        row.update(
            step_s=statistics.median(samples),
            it_s=1 / statistics.median(samples),
            steps=len(samples),
            trainable=sum(p.numel() for p in params),
        )
        if device.type == "cuda":
            row.update(
                peak_alloc_gib=torch.cuda.max_memory_allocated(device) / GIB,
                peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
            )
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        undo()
        optimizer = step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """time_ratio and vram_ratio of each row against vanilla of the same setting."""
    key = lambda r: tuple((k, r[k]) for k in SETTING_KEYS)  # noqa: E731
    vanilla = {key(r): r for r in rows if r["config"] == "vanilla" and "step_s" in r}
    for r in rows:
        v = vanilla.get(key(r))
        if v is None or "step_s" not in r:
            continue
        r["time_ratio"] = r["step_s"] / v["step_s"]
        if "peak_alloc_gib" in r:
            r["vram_ratio"] = r["peak_alloc_gib"] / v["peak_alloc_gib"]


SETTING_KEYS = ("model", "batch", "precision", "optimizer", "checkpointing", "attention", "base_dtype")


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets against the measured CUDA rows: worst case of each, 'pass', 'FAIL' or 'not
    measured' (CPU timings of tiny models say nothing about a GPU)."""
    rows = [r for r in rows if r["device"].startswith("cuda")]

    def worst(values):
        values = [(v, where) for v, where in values if v is not None]
        return max(values, key=lambda x: x[0]) if values else (None, "")

    def where(r):
        return " ".join(f"{r[k]}" for k in SETTING_KEYS)

    def fit(model):
        # every configuration that trains must fit; an out-of-memory row counts as not fitting
        return [
            (float("inf") if "error" in r else r.get("peak_reserved_gib"), where(r) + " " + r["config"])
            for r in rows
            if r["model"] == model
            and r["batch"] == 1
            and r["optimizer"] == "adamw8bit"
            and r["checkpointing"]
            and r["config"] != "peft"
        ]

    checks = [
        [(r.get("time_ratio"), where(r)) for r in rows if r["config"] == "tsm8"],
        [(r.get("vram_ratio"), where(r)) for r in rows if r["config"] == "tsm8"],
        [(r.get("time_ratio"), where(r)) for r in rows if r["config"] == "stage2"],
        fit("sd15"),
        fit("sdxl"),
    ]
    out = []
    for (name, limit), values in zip(TARGETS, checks):
        value, at = worst(values)
        status = "not measured" if value is None else ("pass" if value <= limit else "FAIL")
        out.append(dict(target=name, limit=limit, worst=value, at=at, status=status))
    return out


def markdown(rows: list[dict], targets: list[dict]) -> str:
    """One line per setting: vanilla's it/s and peak, each other configuration as a ratio to it."""
    settings = []
    for r in rows:
        s = tuple(r[k] for k in SETTING_KEYS)
        if s not in settings:
            settings.append(s)
    head = (
        "| model | batch | autocast | optimizer | ckpt | attention | base | vanilla it/s | tsm8 time | stage2 time "
        "| peft time | vanilla peak GiB (reserved) | tsm8 VRAM | stage2 VRAM | peft VRAM |"
    )
    lines = [head, "|---" * 15 + "|"]
    for s in settings:
        by = {r["config"]: r for r in rows if tuple(r[k] for k in SETTING_KEYS) == s}
        v = by.get("vanilla", {})

        def ratio(c, field):
            r = by.get(c, {})  # noqa: B023 (used in this iteration only)
            return "OOM" if "error" in r else (f"{r[field]:.3f}x" if field in r else "-")

        peak = (
            "OOM"
            if "error" in v
            else (f"{v['peak_alloc_gib']:.2f} ({v['peak_reserved_gib']:.2f})" if "peak_alloc_gib" in v else "n/a (CPU)")
        )
        cells = [("on" if x else "off") if isinstance(x, bool) else str(x) for x in s]
        cells.append("OOM" if "error" in v else (f"{v['it_s']:.2f}" if "it_s" in v else "-"))
        cells += [ratio(c, "time_ratio") for c in CONFIGS[1:]] + [peak] + [ratio(c, "vram_ratio") for c in CONFIGS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target | limit | worst measured | where | status |", "|---|---|---|---|---|"]
    for t in targets:
        value = "-" if t["worst"] is None else ("OOM" if t["worst"] == float("inf") else f"{t['worst']:.3f}")
        lines.append(f"| {t['target']} | {t['limit']} | {value} | {t['at'] or '-'} | {t['status']} |")
    return "\n".join(lines)


def settings_for(args) -> list[dict]:
    """The grid, batch-1 AdamW8bit + checkpointing first (the memory targets), then the rest."""
    grid = [
        dict(zip(SETTING_KEYS, values))
        for values in itertools.product(
            args.models, args.batch, args.precision, args.optimizer, args.checkpointing, args.attention, args.base_dtype
        )
    ]
    return sorted(
        grid,
        key=lambda s: (
            args.models.index(s["model"]),
            not (s["batch"] == 1 and s["optimizer"] == "adamw8bit" and s["checkpointing"]),
        ),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: sd15-tiny and sdxl-tiny, batch 2, bf16, AdamW, checkpointing off and on, 1 step",
    )
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default sd15 sdxl")
    ap.add_argument("--batch", nargs="+", type=int, help="default 1 2 4")
    ap.add_argument("--precision", nargs="+", choices=sorted(DTYPES), help="autocast dtypes (default fp16 bf16)")
    ap.add_argument(
        "--optimizer",
        nargs="+",
        choices=("adamw", "adamw8bit"),
        help="default adamw adamw8bit (adamw8bit needs bitsandbytes)",
    )
    ap.add_argument("--checkpointing", nargs="+", choices=("off", "on"), help="gradient checkpointing (default off on)")
    ap.add_argument(
        "--attention", nargs="+", choices=("sdpa", "xformers"), help="default sdpa, and xformers when it is installed"
    )
    ap.add_argument(
        "--base_dtype",
        nargs="+",
        choices=("half", "fp32"),
        help="frozen weights in the autocast dtype (default) or fp32",
    )
    ap.add_argument(
        "--warmup", type=int, help="warm-up steps per configuration, the first included (default 3; quick 1)"
    )
    ap.add_argument("--steps", type=int, help="timed steps per configuration (default 10; quick 1)")
    ap.add_argument(
        "--budget_s",
        type=float,
        default=float("inf"),
        help="stop starting new settings after this many seconds (what was measured is kept)",
    )
    ap.add_argument("--out", default="bench_gpu.json", help="JSON output (rewritten after every setting)")
    args = ap.parse_args(argv)

    import importlib.util

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        defaults = dict(
            models=["sd15-tiny", "sdxl-tiny"],
            batch=[2],
            precision=["bf16"],
            optimizer=["adamw"],
            checkpointing=["off", "on"],
            attention=["sdpa"],
            base_dtype=["half"],
            warmup=1,
            steps=1,
        )
    else:
        if device.type != "cuda":
            ap.error("full-size models need a CUDA GPU (--device cuda); on CPU use --quick")
        xformers = importlib.util.find_spec("xformers") is not None
        defaults = dict(
            models=["sd15", "sdxl"],
            batch=[1, 2, 4],
            precision=["fp16", "bf16"],
            optimizer=["adamw", "adamw8bit"],
            checkpointing=["off", "on"],
            attention=["sdpa"] + (["xformers"] if xformers else []),
            base_dtype=["half"],
            warmup=3,
            steps=10,
        )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.checkpointing = [c in (True, "on") for c in args.checkpointing]
    if "adamw8bit" in args.optimizer and importlib.util.find_spec("bitsandbytes") is None:
        ap.error("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes), or pass --optimizer adamw")
    if "xformers" in args.attention and importlib.util.find_spec("xformers") is None:
        ap.error("--attention xformers: xformers is not installed (pip install xformers, CUDA only)")

    import diffusers
    import peft

    info = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        peft=peft.__version__,
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
    print(", ".join(f"{k} {v}" for k, v in info.items() if v))
    start = time.time()
    rows: list[dict] = []
    model = unet = encoders = None
    for setting in settings_for(args):
        if time.time() - start > args.budget_s:
            print(f"--budget_s {args.budget_s:.0f} spent: stopping before {setting}")
            break
        if model != setting["model"]:
            unet = encoders = None  # free the previous model first
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = setting["model"]
            unet, encoders = build_models(model, device)
        dtype = DTYPES[setting["precision"]] if setting["base_dtype"] == "half" else torch.float32
        for m in (unet, *encoders):
            m.to(dtype=dtype)
        set_attention(unet, setting["attention"])
        if setting["checkpointing"]:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        for config in CONFIGS:
            rows.append(measure(setting, config, unet, encoders, device, args.warmup, args.steps))
        add_ratios(rows)
        line = rows[-4:]
        print(
            " ".join(f"{k}={setting[k]}" for k in SETTING_KEYS)
            + ": "
            + ", ".join(f"{r['config']} " + (r["error"] if "error" in r else f"{r['it_s']:.2f} it/s") for r in line),
            flush=True,
        )
        targets = check_targets(rows)
        with open(args.out + ".tmp", "w") as f:
            json.dump(dict(info=info, rows=rows, targets=targets, seconds=time.time() - start), f, indent=2)
        os.replace(args.out + ".tmp", args.out)
    targets = check_targets(rows)
    print("\n" + markdown(rows, targets))
    print(f"\nwrote {args.out} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
