"""Two feature sets a metric compares, real (N, D) against fake (M, D): the input check KID and PRDC share."""
from __future__ import annotations

import numpy as np
import torch

from neon.errors import NeonError


def feature_pair(real, fake, metric: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """real and fake features (arrays or tensors) as float64 tensors, on `device` or where they are; a one-line
    NeonError, prefixed with the metric's name, for a set that is not (N, D) or sets of different dimensions."""
    def as_features(x, name: str) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if x.ndim != 2:
            raise NeonError(f"{metric}: {name} features must be (N, D), got {tuple(x.shape)}")
        return x.to(device=device if device is not None else x.device, dtype=torch.float64)

    real, fake = as_features(real, "real"), as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise NeonError(f"{metric}: real features are {real.shape[1]}-d, fake ones {fake.shape[1]}-d")
    return real, fake
