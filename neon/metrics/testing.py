"""Random but fully seeded InceptionV3 weights in torch-fidelity's layout, for offline tests and benchmarks.

Every tensor is drawn from the seed so that every parameter moves the features: He-scaled convolutions,
batch-norm γ, β, running mean and variance near their trained ranges, and a random 1008-way output layer.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from neon.checkpoint import atomic_save
from neon.metrics.compat import compat_architecture


def random_compat_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = compat_architecture().state_dict()

    def uniform(t, lo, hi):
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    out = {}
    for key, t in state.items():
        if key.endswith("conv.weight"):
            t = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5   # He: keeps activations O(1)
        elif key.endswith("bn.weight"):
            t = uniform(t, 0.5, 1.5)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            t = torch.randn(t.shape, generator=g) * 0.1
        elif key.endswith("running_var"):
            t = uniform(t, 0.5, 2.0)
        elif key == "fc.weight":
            t = torch.randn(t.shape, generator=g) * 2048 ** -0.5 * 16.0           # logits that differ between images
        elif key == "fc.bias":
            t = torch.randn(t.shape, generator=g)
        out[key] = t.clone()
    return out


def save_random_compat_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write random_compat_state_dict(seed) where torch-fidelity's `feature_extractor_weights_path` can read it."""
    state = random_compat_state_dict(seed)
    atomic_save(state, path)
    return Path(path)


def random_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, height, width, 3) test images that differ in more than noise: a random 4×4 colour layout
    (bilinearly enlarged), a random overall brightness and contrast, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(layout, size=(height, width), mode="bilinear", align_corners=False)
    contrast, brightness = torch.rand(n, 1, 1, 1, generator=g) * 1.5, torch.rand(n, 1, 1, 1, generator=g)
    x = (x - 0.5) * contrast + brightness + 0.05 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
