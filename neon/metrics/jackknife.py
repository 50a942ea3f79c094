"""The Fréchet distance of a feature set with its jackknife: the distance recomputed with each of K contiguous
groups of the images left out. Two image sets drawn from the same seeds and cut into the same groups give a
paired difference whose std is the jackknife's (neon.adaptive.paired): far smaller than either distance's own
noise, which is what lets a selection compare points on a few hundred images.

Leaving a group out costs no second pass over the features: with x̃ = x − μ (all images) and S = Σ x̃ x̃ᵀ, the
complement of group k has mean μ + m_k, m_k = −Σ_{i∈k} x̃_i / n_c, and covariance
(S − Σ_{i∈k} x̃_i x̃_iᵀ − n_c·m_k m_kᵀ) / (n_c − 1), the same unbiased estimator as the full set's.
"""
from __future__ import annotations

import numpy as np
import torch

from neon.errors import NeonError
from neon.metrics.frechet import frechet_distance, gaussian_from_features


def group_bounds(n: int, groups: int) -> list[tuple[int, int]]:
    """[start, stop) of `groups` contiguous groups of n positions, sizes differing by at most one."""
    edges = [round(k * n / groups) for k in range(groups + 1)]
    return list(zip(edges[:-1], edges[1:]))


def frechet_jackknife(features: torch.Tensor, ref_mu: np.ndarray, ref_sigma: np.ndarray, groups: int,
                      covariance: str = "unbiased") -> tuple[float, tuple[float, ...]]:
    """(FD of all N features to the reference, (FD with group k left out for each k)). features (N, D)."""
    n = features.shape[0]
    if groups < 2 or n < 2 * groups + 2:
        raise NeonError(f"jackknife: needs ≥ 2 groups and ≥ 2 images per group plus 2, got {groups} groups of "
                        f"{n} images")
    mu, sigma = gaussian_from_features(features, covariance)
    full = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    x = features.to(torch.float64)
    xc = x - torch.as_tensor(mu, device=x.device)
    scatter = xc.T @ xc
    out = []
    for start, stop in group_bounds(n, groups):
        g = xc[start:stop]
        n_c = n - (stop - start)
        m = -g.sum(0) / n_c
        s = (scatter - g.T @ g - n_c * torch.outer(m, m)) / (n_c - 1)
        mu_c = torch.as_tensor(mu, device=x.device) + m
        if covariance == "neon_edm":   # as neon.metrics.frechet.gaussian_from_features
            s = s + torch.outer(mu_c, mu_c) / (n_c - 1)
        out.append(frechet_distance(mu_c.cpu().numpy(), s.cpu().numpy(), ref_mu, ref_sigma))
    return full, tuple(out)
