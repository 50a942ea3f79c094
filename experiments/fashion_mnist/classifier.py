"""The feature network of "classifier FD": a small CNN trained on the 16×16 Fashion-MNIST train split.

Fréchet distance needs a feature space in which image sets are compared. Inception-v3 features (FID) are
meaningless on 16×16 grayscale clothing, so the study trains its own classifier and uses its penultimate layer —
the global-average-pooled ReLU maps, 4·width dimensions, like Inception's pool3 — and reports the Fréchet
distance there as "classifier FD" (never FID). Pixel-space FD is reported beside it.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from neon.checkpoint import atomic_save
from neon.errors import NeonError


class FeatureCNN(nn.Module):
    """x: (B, 1, 16, 16) float in [-1, 1] -> logits (B, num_classes); `features(x)` -> (B, 4·width)."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.width, self.num_classes, self.in_channels = width, num_classes, in_channels

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.trunk = nn.Sequential(*block(in_channels, w),          # 16×16
                                   *block(w, 2 * w, stride=2),      # 8×8
                                   *block(2 * w, 2 * w),
                                   *block(2 * w, 4 * w, stride=2),  # 4×4
                                   *block(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise NeonError(f"classifier: expected uint8 (B, H, W, C) images, got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


def train_classifier(images: np.ndarray, labels: np.ndarray, width: int, epochs: int, batch: int, lr: float,
                     seed: int, log=print) -> FeatureCNN:
    """Adam with a linear decay to 0, seeded init and seeded shuffles; images uint8 (N, 16, 16, 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureCNN(width, int(labels.max()) + 1, images.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total)
    x_all, y_all = to_input(images), torch.as_tensor(labels)
    net.train()
    t0 = time.time()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        correct = 0
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            logits = net(x_all[idx])
            loss = nn.functional.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        log(f"classifier epoch {epoch + 1}/{epochs}: train accuracy {correct / n:.4f} ({time.time() - t0:.0f} s)")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net: FeatureCNN, images: np.ndarray, batch: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) -> (features float64 (N, 4·width), softmax probabilities float64 (N, classes))."""
    feats, probs = [], []
    for i in range(0, len(images), batch):
        f = net.features(to_input(images[i:i + batch]))
        feats.append(f.double())
        probs.append(net.head(f).softmax(1).double())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def save_classifier(net: FeatureCNN, path: str, **facts) -> None:
    atomic_save({"state_dict": net.state_dict(), "width": net.width, "num_classes": net.num_classes,
                 "in_channels": net.in_channels, **facts}, path)


def load_classifier(path: str) -> tuple[FeatureCNN, dict]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    net = FeatureCNN(obj["width"], obj["num_classes"], obj["in_channels"])
    net.load_state_dict(obj["state_dict"])
    facts = {k: v for k, v in obj.items() if k not in ("state_dict",)}
    return net.eval().requires_grad_(False), facts
