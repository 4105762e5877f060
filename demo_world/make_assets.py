"""Build the demo base model: train a tiny SD-shaped VAE and UNet on the shapes world (CPU, minutes).

``python tools/make_demo_assets.py`` writes ``demo_assets/base_model/`` (a diffusers
StableDiffusionPipeline folder), ``demo_assets/sample_grid.png`` and ``demo_assets/base_model_eval.json``.

1. Autoencoder: trained on renders in random colours of any hue, light to dark (so the target
   domain's hues can be decoded, while its colour *words* stay unseen): L1 + MSE + an L1 on 8x8-pooled
   images (hue fidelity) + a tiny KL term.
2. Text encoder: a random-init CLIP text model, frozen (like a pretrained encoder the UNet adapts to).
3. UNet: epsilon prediction on the base domain's latents with the SD noise schedule, min-SNR-5
   weighting, 10% caption dropout (for classifier-free guidance), AdamW with a cosine schedule.

Deterministic given ``--seed`` (fixed step counts; 2 threads). ``--minutes`` is a safety budget: if
the timed first steps project past it, step counts are scaled down before training (reported).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from demo_world import base_model as bm
from demo_world import shapes

FULL = dict(
    n_images=6000,
    n_vae_images=4000,
    vae_steps=1600,
    vae_batch=16,
    unet_steps=4000,
    unet_batch=32,
    grid_steps=30,
    eval_per_combo=1,
)
QUICK = dict(
    n_images=192,
    n_vae_images=128,
    vae_steps=15,
    vae_batch=8,
    unet_steps=25,
    unet_batch=16,
    grid_steps=4,
    eval_per_combo=0,
)
GUIDANCE = 4.0
RESERVE_S = 150  # saving, the sample grid and the evaluation after the UNet's deadline
SAMPLE_STEPS_DEFAULT = 30


def _log(msg):
    print(msg, flush=True)


def _to_tensor(images_uint8):
    import torch

    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _cosine_lr(progress, peak, warmup=0.02):
    if progress < warmup:
        return peak * max(progress / warmup, 0.02)
    p = (progress - warmup) / (1 - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class _Progress:
    """Training progress in [0, 1]: steps done / steps, or, when a deadline is given and the machine is
    slower than planned, the elapsed share of the time left (then training ends early, with the learning
    rate schedule compressed rather than cut, and the run is no longer seed-deterministic)."""

    def __init__(self, steps, deadline=None):
        self.steps, self.deadline, self.t0 = steps, deadline, time.time()
        self.time_bound = False

    def __call__(self, step):
        p = step / self.steps
        if self.deadline is not None:
            pt = (time.time() - self.t0) / max(1e-6, self.deadline - self.t0)
            if pt > p:
                self.time_bound, p = True, pt
        return min(p, 1.0)


def train_vae(vae, images, steps, batch, seed, lr=2e-3, kl_weight=1e-6, colour_weight=2.0, deadline=None):
    """L1 + MSE + a tiny KL, plus L1 between 8x8-pooled images: the pooled term is what makes hues
    come back (without it the autoencoder spends itself on the textures and renders pink as lavender)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = _to_tensor(images)
    vae.train()
    t0, step, progress = time.time(), 0, _Progress(steps, deadline)
    while (p := progress(step)) < 1.0:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(p, lr)
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x = data[idx]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        colour = (F.avg_pool2d(rec, 8) - F.avg_pool2d(x, 8)).abs().mean()
        loss = l1 + 0.5 * (rec - x).pow(2).mean() + colour_weight * colour + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % max(1, steps // 6) == 0 or step == steps:
            _log(f"  vae step {step}/{steps}  l1 {l1.item():.4f}  kl {kl.item():.1f}  ({time.time() - t0:.0f}s)")
    if progress.time_bound:
        _log(f"  vae: time budget reached after {step}/{steps} steps (machine slower than planned)")
    vae.eval()
    return step


def encode_latents(vae, images, batch=256):
    """Posterior mean and std of ``images`` (uint8 NHWC), unscaled."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            post = vae.encode(_to_tensor(images[i : i + batch])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def embed_captions(text_encoder, tokenizer, captions):
    """Unique captions -> (index per caption, embeddings of the unique captions + the empty prompt last)."""
    import torch

    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    ids = tokenizer(
        unique + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
    return torch.tensor([lookup[c] for c in captions]), emb


def train_unet(
    unet,
    latents_mean,
    latents_std,
    caption_idx,
    text_emb,
    scaling,
    steps,
    batch,
    seed,
    lr=1e-3,
    drop=0.1,
    snr_gamma=5.0,
    deadline=None,
):
    import torch

    sched = bm.make_scheduler("ddpm")
    alphas = sched.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    empty = text_emb.shape[0] - 1
    unet.train()
    t0, step, avg, progress = time.time(), 0, None, _Progress(steps, deadline)
    while (p := progress(step)) < 1.0:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(p, lr)
        idx = torch.randint(0, len(latents_mean), (batch,), generator=gen)
        z0 = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)) * scaling
        flip = torch.rand(batch, generator=gen) < 0.5  # shapes are left-right symmetric
        z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = caption_idx[idx].clone()
        cond[torch.rand(batch, generator=gen) < drop] = empty
        pred = unet(zt, t, text_emb[cond]).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=snr_gamma) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % max(1, steps // 10) == 0 or step == steps:
            _log(f"  unet step {step}/{steps}  loss(ema) {avg:.4f}  ({time.time() - t0:.0f}s)")
    if progress.time_bound:
        _log(f"  unet: time budget reached after {step}/{steps} steps (machine slower than planned)")
    unet.eval()
    return step


def generate(pipe, prompts, seed, steps=SAMPLE_STEPS_DEFAULT, guidance=GUIDANCE, batch=50):
    """Images for ``prompts`` (one each), deterministic given ``seed``."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        out += pipe(
            prompts[i : i + batch],
            height=bm.IMAGE_SIZE,
            width=bm.IMAGE_SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
        ).images
    return out


def grid_prompts():
    """Every base shape x colour, backgrounds cycling (rows: shapes, columns: colours)."""
    prompts = []
    for i, shape in enumerate(shapes.SHAPES):
        for j, colour in enumerate(shapes.BASE_COLOURS):
            bg = shapes.BACKGROUNDS[(i + j) % len(shapes.BACKGROUNDS)]
            prompts.append(shapes.caption({"shape": shape, "colour": colour, "background": bg}))
    return prompts, len(shapes.BASE_COLOURS)


def caption_grid(images, captions, cols, scale=2, detections=None):
    """Images in a grid with their prompt (and optionally the detector's reading) under each."""
    from PIL import Image, ImageDraw

    cell = images[0].width * scale
    text_h = 24 if detections is None else 34
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (img, cap) in enumerate(zip(images, captions)):
        x, y = 4 + (k % cols) * (cell + 4), 4 + (k // cols) * (cell + text_h + 4)
        grid.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
        words = cap.replace("a ", "", 1).replace(" background", "").split(" on a ")
        draw.text((x + 1, y + cell + 1), words[0], fill=(0, 0, 0))
        draw.text((x + 1, y + cell + 11), "on " + (words[1] if len(words) > 1 else ""), fill=(90, 90, 90))
        if detections is not None:
            d = detections[k]
            draw.text((x + 1, y + cell + 21), f"seen: {d['colour']} {d['shape']}", fill=(0, 110, 0))
    return grid


def evaluate(pipe, seed, per_combo, steps, domain="base", guidance=GUIDANCE):
    """Attribute score of the model's samples for every combination of ``domain`` (``per_combo`` each)."""
    from demo_world.attribute_score import all_combos, attribute_score

    score = attribute_score(
        lambda prompts, s: generate(pipe, prompts, s, steps=steps, guidance=guidance),
        all_combos(domain) * per_combo,
        seeds=[seed],
    )
    return {k: round(v, 3) for k, v in score.items()}


def sample_and_evaluate(out_dir, seed=0, steps=SAMPLE_STEPS_DEFAULT, per_combo=1, guidance=GUIDANCE, timings=None):
    """Write ``sample_grid.png`` for ``out_dir/base_model`` and score its samples with the detector."""
    timings = {} if timings is None else timings
    t = time.time()
    pipe = bm.load_pipeline(os.path.join(out_dir, "base_model"))
    prompts, cols = grid_prompts()
    imgs = generate(pipe, prompts, seed + 4, steps=steps, guidance=guidance)
    detections = [shapes.detect_attributes(im) for im in imgs]
    caption_grid(imgs, prompts, cols, detections=detections).save(os.path.join(out_dir, "sample_grid.png"))
    timings["grid_s"] = time.time() - t
    report = {"guidance_scale": guidance, "sample_steps": steps, "sampler": "DDIM"}
    if per_combo:
        t = time.time()
        report["detector_accuracy_base_prompts"] = evaluate(pipe, seed + 5, per_combo, steps, guidance=guidance)
        report["detector_accuracy_target_prompts"] = evaluate(pipe, seed + 6, 1, steps, "target", guidance=guidance)
        timings["eval_s"] = time.time() - t
        _log(f"detector accuracy on base-domain prompts: {report['detector_accuracy_base_prompts']}")
        _log(f"detector accuracy on target-domain prompts (unseen words): {report['detector_accuracy_target_prompts']}")
    return report


def build(out_dir, seed=0, quick=False, minutes=None, threads=2):
    """Train and write the assets; returns a dict of timings, sizes and evaluation results."""
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    cfg = QUICK if quick else FULL
    budget = None if minutes is None else minutes * 60.0
    t_start = time.time()
    timings = {}
    os.makedirs(out_dir, exist_ok=True)

    t = time.time()
    images, attrs, captions = shapes.make_arrays(cfg["n_images"], "base", seed=seed)
    vae_images = np.concatenate([shapes.make_autoencoder_arrays(cfg["n_vae_images"], seed=seed + 1), images])
    timings["render_s"] = time.time() - t
    _log(f"rendered {len(images)} base images + {cfg['n_vae_images']} any-hue images in {timings['render_s']:.1f}s")

    vae, unet, text_encoder, tokenizer = bm.make_models(seed)
    t = time.time()
    _log(f"training VAE ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params)")
    vae_steps = train_vae(
        vae,
        vae_images,
        cfg["vae_steps"],
        cfg["vae_batch"],
        seed,
        deadline=None if budget is None else t_start + 0.22 * budget,
    )
    timings["vae_s"] = time.time() - t

    t = time.time()
    mean, std = encode_latents(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    caption_idx, text_emb = embed_captions(text_encoder, tokenizer, captions)
    timings["encode_s"] = time.time() - t
    _log(f"encoded latents {tuple(mean.shape)} (scaling_factor {scaling:.3f}) in {timings['encode_s']:.1f}s")

    t = time.time()
    _log(f"training UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params)")
    deadline = None if budget is None else max(time.time() + 60.0, t_start + budget - RESERVE_S)
    unet_steps = train_unet(
        unet,
        mean,
        std,
        caption_idx,
        text_emb,
        scaling,
        cfg["unet_steps"],
        cfg["unet_batch"],
        seed + 3,
        deadline=deadline,
    )
    timings["unet_s"] = time.time() - t

    folder = os.path.join(out_dir, "base_model")
    bm.save_pipeline(folder, vae, unet, text_encoder)
    size = bm.folder_size(folder)
    _log(f"wrote {folder} ({size / 1e6:.2f} MB)")

    report = {
        "seed": seed,
        "quick": quick,
        "model_mb": round(size / 1e6, 2),
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "deterministic": vae_steps == cfg["vae_steps"] and unet_steps == cfg["unet_steps"],
    }
    report.update(sample_and_evaluate(out_dir, seed, cfg["grid_steps"], cfg["eval_per_combo"], timings=timings))
    timings["total_s"] = time.time() - t_start
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    with open(os.path.join(out_dir, "base_model_eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    _log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="demo_assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny step counts)")
    p.add_argument(
        "--minutes",
        type=float,
        default=27.0,
        help="time budget (default 27): on a machine slower than planned, training stops early with "
        "its learning-rate schedule compressed (reported; then not seed-deterministic); 0 = none",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--resample",
        action="store_true",
        help="only redo the sample grid and evaluation of an existing OUT_DIR/base_model",
    )
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--sample_steps", type=int, default=SAMPLE_STEPS_DEFAULT)
    args = p.parse_args(argv)
    if args.resample:
        import torch

        torch.set_num_threads(args.threads)
        report = sample_and_evaluate(
            args.out_dir, args.seed, args.sample_steps, 0 if args.quick else 1, guidance=args.guidance
        )
        print(json.dumps(report, indent=2))
        return
    minutes = None if args.quick or not args.minutes else args.minutes
    build(args.out_dir, seed=args.seed, quick=args.quick, minutes=minutes, threads=args.threads)


if __name__ == "__main__":
    main()
