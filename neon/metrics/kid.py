"""Kernel Inception Distance (Bińkowski et al. 2018) with torch-fidelity's convention.

    KID = MMD²_u(F, R) with the polynomial kernel k(x, y) = (γ·x·y + coef0)^degree, γ = 1/D, coef0 = 1, degree 3,
    averaged over `subsets` random subsets of `subset_size` fakes and as many reals (drawn without replacement).

Everything below follows toshas/torch-fidelity@5b1e99c torch_fidelity/metric_kid.py (`kid_features_to_metric`,
`kernel_poly`, `mmd2` with mmd_est='unbiased') and its defaults.py (kid_subsets 100, kid_subset_size 1000,
rng_seed 2020): the subsets come from one `np.random.RandomState(seed)`, fake indices drawn before real ones in
every subset (torch-fidelity's input1 is the generated set), so our numbers equal its numbers on the same features.
Two differences, both stated in the result: torch-fidelity refuses sets smaller than the subset size, here the
subset size shrinks to the smaller set (as clean-fid's kernel_distance does) and `kid_subset_size` records the size
used; and the kernel is computed in float64 on the features' device (a GPU when there is one).
"""
from __future__ import annotations

import numpy as np
import torch

from neon.errors import NeonError
from neon.metrics.pair import feature_pair

SUBSETS = 100        # torch-fidelity defaults.py kid_subsets
SUBSET_SIZE = 1000   # torch-fidelity defaults.py kid_subset_size
SEED = 2020          # torch-fidelity defaults.py rng_seed
DEGREE, COEF0 = 3, 1.0


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = DEGREE, gamma: float | None = None,
                      coef0: float = COEF0) -> torch.Tensor:
    """(γ·x·yᵀ + coef0)^degree for x (M, D), y (N, D) → (M, N); γ = 1/D when None."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_xy: torch.Tensor, k_yy: torch.Tensor) -> torch.Tensor:
    """The unbiased MMD² estimate from kernel matrices of two m-sample sets (m, m): within-set sums without the
    diagonal over m(m−1), the cross term over m² (torch-fidelity's mmd2, mmd_est='unbiased')."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kid(real_feats, fake_feats, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE, degree: int = DEGREE,
        gamma: float | None = None, coef0: float = COEF0, seed: int = SEED, device=None) -> dict:
    """{'kid_mean', 'kid_std', 'kid_subset_size'} of fake features (M, D) against real features (N, D).

    kid_std is the (population) standard deviation of the per-subset estimates, as torch-fidelity reports it.
    KID can be slightly negative when the two sets come from the same distribution (the estimate is unbiased).
    """
    real, fake = feature_pair(real_feats, fake_feats, "kid", device)
    if subsets < 1:
        raise NeonError(f"kid: subsets must be at least 1, got {subsets}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:  # the unbiased estimator divides by m(m−1)
        raise NeonError(f"kid: need at least 2 real and 2 fake samples (and subset_size ≥ 2), got "
                        f"{real.shape[0]} real, {fake.shape[0]} fake, subset_size {subset_size}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        f = fake[torch.from_numpy(rng.choice(fake.shape[0], size, replace=False)).to(fake.device)]
        r = real[torch.from_numpy(rng.choice(real.shape[0], size, replace=False)).to(real.device)]
        k = dict(degree=degree, gamma=gamma, coef0=coef0)
        mmds[i] = mmd2_unbiased(polynomial_kernel(f, f, **k), polynomial_kernel(f, r, **k),
                                polynomial_kernel(r, r, **k)).item()
    return {"kid_mean": float(np.mean(mmds)), "kid_std": float(np.std(mmds)), "kid_subset_size": size}
