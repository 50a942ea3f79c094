"""Inception Score, torch-fidelity's convention (the paper's ImageNet IS numbers).

    IS = exp( E_x KL( p(y|x) ‖ p(y) ) ),  p(y|x) = softmax(unbiased logits),  p(y) = mean of p(y|x) over a split

The samples are shuffled with numpy RandomState(2020), cut into `splits` contiguous parts (part i is
[i·N // splits, (i+1)·N // splits)), and the mean and population std of the per-part scores are reported.
"""
from __future__ import annotations

import numpy as np
import torch

from neon.errors import NeonError


def inception_score(logits, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of IS over `splits` parts of logits (N, C) (unbiased logits; log-probabilities work too)."""
    x = torch.as_tensor(np.asarray(logits)) if not isinstance(logits, torch.Tensor) else logits
    if x.ndim != 2:
        raise NeonError(f"inception_score: expected logits (N, C), got {tuple(x.shape)}")
    n = x.shape[0]
    if n < splits:
        raise NeonError(f"inception_score: {n} images cannot be cut into {splits} splits")
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    x = x.double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_y = p[part].mean(dim=0, keepdim=True)                      # marginal p(y) over this split
        kl = (p[part] * (log_p[part] - p_y.log())).sum(dim=1).mean()  # E_x KL(p(y|x) ‖ p(y))
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))
