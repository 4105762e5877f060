"""Image features for a small-sample FID-like distance on the shapes world.

Inception features know nothing of 64x64 procedural shapes, so the distance uses a small CNN trained
here to read the world's attributes (shape, colour, background) from renders; its pooled 64-d
features feed a Fréchet distance, as FID does with Inception's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from demo_world import shapes


class ShapesFeatureNet(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> (B, 64) features; heads for shape, colour and background."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict(
            {
                "shape": nn.Linear(64, len(shapes.SHAPES)),
                "colour": nn.Linear(64, len(shapes.COLOURS)),
                "background": nn.Linear(64, len(shapes.BACKGROUNDS)),
            }
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL images or a uint8 (N, H, W, 3) array -> (N, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_feature_net(n_images: int = 3000, steps: int = 600, seed: int = 0, batch: int = 64) -> ShapesFeatureNet:
    """Train on renders of every colour (base and target domains); deterministic given ``seed``."""
    torch.manual_seed(seed)
    half = n_images // 2
    base, attrs_b, _ = shapes.make_arrays(half, "base", seed=seed + 100)
    target, attrs_t, _ = shapes.make_arrays(n_images - half, "target", seed=seed + 101)
    x = to_tensor(np.concatenate([base, target]))
    attrs = attrs_b + attrs_t
    labels = {
        "shape": torch.tensor([shapes.SHAPES.index(a["shape"]) for a in attrs]),
        "colour": torch.tensor([list(shapes.COLOURS).index(a["colour"]) for a in attrs]),
        "background": torch.tensor([shapes.BACKGROUNDS.index(a["background"]) for a in attrs]),
    }
    net = ShapesFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        out = net(x[idx])
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def extract(net: ShapesFeatureNet, images, batch: int = 256) -> torch.Tensor:
    x = to_tensor(images)
    return torch.cat([net.features(x[i : i + batch]) for i in range(0, len(x), batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m):
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrtm_psd(s_a)
    cross = sqrtm_psd(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a + s_b - 2 * cross))
