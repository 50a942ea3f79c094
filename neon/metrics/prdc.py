"""Precision, recall, density and coverage (Naeem et al. 2020, the `prdc` package's definitions), k-NN balls.

For real features R and fake features F, with r_k(x) the distance from x to its k-th nearest neighbour in its
own set (itself excluded):
    precision = frac. of fakes inside some real ball        (∃ i: |f − R_i| < r_k(R_i))
    recall    = frac. of reals inside some fake ball        (∃ j: |r − F_j| < r_k(F_j))
    density   = (1/k) · mean over fakes of the number of real balls containing it
    coverage  = frac. of reals whose nearest fake lies inside their own ball
The paper used k = 5.
"""
from __future__ import annotations

import torch

from neon.errors import NeonError
from neon.metrics.pair import feature_pair


def _blocks(a: torch.Tensor, b: torch.Tensor, block: int):
    """Yield (row slice, Euclidean distances (rows, len(b)) float64) over row blocks of a: the full
    len(a) × len(b) matrix (20 GB for 50k × 50k) is never held."""
    for start in range(0, a.shape[0], block):
        rows = slice(start, min(start + block, a.shape[0]))
        yield rows, torch.cdist(a[rows], b)


def kth_neighbour_radius(x: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row."""
    # The (k+1)-th smallest distance in a row counts the point itself (distance 0).
    return torch.cat([d.kthvalue(k + 1, dim=1).values for _, d in _blocks(x, x, block)])


def prdc(real_feats, fake_feats, k: int = 5, block: int = 1024) -> dict[str, float]:
    """{'precision', 'recall', 'density', 'coverage'} of fake features (M, D) against real features (N, D)."""
    real, fake = feature_pair(real_feats, fake_feats, "prdc")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise NeonError(f"prdc: need more than k={k} real and fake samples, got {real.shape[0]} and {fake.shape[0]}")
    real_radius = kth_neighbour_radius(real, k, block)   # (N,)
    fake_radius = kth_neighbour_radius(fake, k, block)   # (M,)
    balls_per_fake = torch.zeros(fake.shape[0], dtype=torch.float64, device=fake.device)  # real balls holding it
    real_recalled = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    real_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    for rows, d in _blocks(real, fake, block):             # d: (rows, M) real-to-fake distances
        balls_per_fake += (d < real_radius[rows, None]).sum(dim=0)
        real_recalled[rows] = (d < fake_radius[None, :]).any(dim=1)
        real_covered[rows] = d.min(dim=1).values < real_radius[rows]
    return {
        "precision": (balls_per_fake > 0).double().mean().item(),
        "recall": real_recalled.double().mean().item(),
        "density": balls_per_fake.mean().item() / k,
        "coverage": real_covered.double().mean().item(),
    }
