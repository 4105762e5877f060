"""Demo: TimeStep Master through the sd-scripts network protocol, on a tiny random UNet.

Runs, with the exact call order of sd-scripts' train_network.py, on CPU in about a minute:
vanilla LoRA (tsm_scales=1), fostering 8 experts (tsm_scales=8), then assembling [8, 1]
(routers only), each with the same number of steps, and prints the held-out denoising loss
per timestep interval side by side. Files are written to ``--output_dir``.

The data is synthetic (smooth random latents), so the numbers show the mechanics, not image
quality; the trainer's demo fine-tunes a real tiny model on a procedural image world.

    python tools/demo_sd_scripts.py --steps 60 --output_dir outputs/demo
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import networks.tsm_lora as tsm_lora
from tsm_trainer.core.intervals import expert_index, interval_timestep_range


def build_models(seed: int = 0):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.requires_grad_(False)
    return unet, DDPMScheduler(num_train_timesteps=1000)


def synthetic_domain(n: int, seed: int):
    """Smooth, low-frequency latents with a per-sample 'caption' embedding that determines them."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, 4, 32, generator=g)
    base = torch.randn(n, 4, 4, 4, generator=g)
    latents = torch.nn.functional.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)
    return latents, cond


def per_interval_loss(unet, sched, latents, cond, n_intervals: int = 8, seed: int = 123) -> list[float]:
    """Held-out loss per interval with fixed noise and timesteps (identical for every method)."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for i in range(n_intervals):
            lo, hi = interval_timestep_range(i, n_intervals)
            t = torch.randint(lo, hi, (len(latents),), generator=g)
            noise = torch.randn(latents.shape, generator=g)
            pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return losses


def train(unet, sched, latents, cond, steps: int, lr: float, batch: int, seed: int, out: str, **network_args):
    """The train_network.py sequence of calls on the network module."""
    network = tsm_lora.create_network(1.0, 4, 4, None, None, unet, neuron_dropout=None, **network_args)
    network.apply_to(None, unet, False, True)
    optimizer = torch.optim.AdamW(network.prepare_optimizer_params(None, lr, lr), weight_decay=1e-2)
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        network.on_step_start(None, unet)
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn((batch, *latents.shape[1:]), generator=g)
        pred = unet(sched.add_noise(latents[idx], noise, t), t, cond[idx]).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    network.eval()
    network.save_weights(out, None, {"ss_output_name": os.path.splitext(os.path.basename(out))[0]})
    return network


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per method and stage")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output_dir", default="outputs/demo")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train_set, held_out = synthetic_domain(64, 1), synthetic_domain(32, 2)
    start = time.time()
    rows = {}

    unet, sched = build_models()
    rows["base"] = per_interval_loss(unet, sched, *held_out)
    runs = [
        ("vanilla (n=1)", {"tsm_scales": "1"}, "vanilla.safetensors"),
        ("TSM foster n=8", {"tsm_scales": "8"}, "tsm_foster8.safetensors"),
    ]
    files = {}
    for label, net_args, name in runs:
        unet, sched = build_models()
        path = os.path.join(args.output_dir, name)
        network = train(unet, sched, *train_set, args.steps, args.lr, args.batch, 0, path, **net_args)
        rows[label] = per_interval_loss(unet, sched, *held_out)
        files[net_args["tsm_scales"]] = path
        network.remove()

    unet, sched = build_models()
    path = os.path.join(args.output_dir, "tsm_assembled.safetensors")
    train(
        unet,
        sched,
        *train_set,
        args.steps,
        args.lr,
        args.batch,
        0,
        path,
        tsm_scales="8,1",
        tsm_stage="assemble",
        tsm_experts=f"{files['8']},{files['1']}",
    )
    rows["TSM assembled [8,1]"] = per_interval_loss(unet, sched, *held_out)

    print(
        f"\nHeld-out denoising loss per timestep interval ({args.steps} steps per stage, batch {args.batch}; "
        "vanilla and fostering use equal total steps, so each n=8 expert saw ~1/8 of them):"
    )
    header = (
        f"{'method':<22}"
        + "".join(f"{f'[{lo},{hi})':>11}" for lo, hi in (interval_timestep_range(i, 8) for i in range(8)))
        + f"{'mean':>9}"
    )
    print(header)
    for label, losses in rows.items():
        print(f"{label:<22}" + "".join(f"{v:>11.4f}" for v in losses) + f"{sum(losses) / len(losses):>9.4f}")
    print(
        f"\nwrote {', '.join(sorted(os.listdir(args.output_dir)))} to {args.output_dir} in {time.time() - start:.0f} s"
    )
    assert expert_index(999, 8) == 7


if __name__ == "__main__":
    main()
