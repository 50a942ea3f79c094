"""Fréchet distance between two Gaussians, FID's formula, in float64.

    d² = |mu1 − mu2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½

tr (Σ1 Σ2)^½ is the sum of the square roots of the eigenvalues of Σ1 Σ2. Σ1 Σ2 is not symmetric, but with a
factorization Σ1 = L Lᵀ it is similar to the symmetric positive semi-definite Lᵀ Σ2 L, whose eigenvalues a
symmetric solver finds exactly and fast. A pivoted Cholesky factor exists for any positive semi-definite Σ1,
so covariances of fewer samples than dimensions (rank-deficient) need no special case: the factor has
fewer columns and the symmetric problem is smaller.
Cost for 2048-d: one pivoted Cholesky, two triangular products and one symmetric eigenvalue solve, about a
tenth of `scipy.linalg.sqrtm(Σ1 Σ2)`, which the ADM/EDM evaluators use.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import blas, lapack

from neon.errors import NeonError


def check_gaussian(mu: np.ndarray, sigma: np.ndarray, what: str = "statistics") -> tuple[np.ndarray, np.ndarray]:
    """mu (D,), sigma (D, D) as finite float64 arrays, or a one-line NeonError."""
    for name, value in (("mu", mu), ("sigma", sigma)):
        kind = np.asarray(value).dtype.kind
        if kind not in "biuf":   # strings, objects, complex numbers: no statistics
            raise NeonError(f"{what}: {name} must hold real numbers, got {np.asarray(value).dtype}")
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise NeonError(f"{what}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise NeonError(f"{what}: mu/sigma contain NaN or inf")
    # A covariance is symmetric with a non-negative diagonal; anything else gives a meaningless (even negative)
    # distance. (Cheap necessary conditions: a full eigen-check of a 2048² matrix would cost seconds per read.)
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale or float(np.diag(sigma).min()) < -1e-9 * scale:
        raise NeonError(f"{what}: sigma is not a covariance (not symmetric, or a negative variance)")
    return mu, sigma


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^½ for positive semi-definite Σ1, Σ2 (D, D) float64."""
    # Pivoted Cholesky: Σ1[p][:, p] = L Lᵀ, stopped (LAPACK's default tol = D·eps·max Σ1_ii) where the
    # remaining pivots are rounding noise; keeping them would add √noise per null direction to the trace.
    c, piv, rank, info = lapack.dpstrf(sigma1, tol=-1.0, lower=1)
    if info < 0:
        raise NeonError(f"Fréchet distance: LAPACK dpstrf failed (info={info})")
    p = piv - 1
    if 2 * rank < len(p):
        # Few samples (rank well below D): only the factor's first `rank` columns are non-zero, so M is two thin
        # products, with L's rows put back in Σ2's order instead of gathering a permuted copy of Σ2.
        L = np.zeros((len(p), rank))
        L[p] = np.tril(c[:, :rank])
        M = L.T @ (sigma2 @ L)
    else:
        L = np.tril(c)
        L[:, rank:] = 0.0  # columns past the numerical rank hold the unfactored remainder
        L = np.asfortranarray(L)
        S2 = np.asfortranarray(sigma2[np.ix_(p, p)])
        # M = Lᵀ Σ2 L with two triangular products (half the flops of two general ones).
        W = blas.dtrmm(1.0, L, S2, side=1, lower=1)                   # Σ2 L
        M = blas.dtrmm(1.0, L, W, side=0, lower=1, trans_a=1)         # Lᵀ (Σ2 L)
        M = M[:rank, :rank]
    eig = scipy.linalg.eigvalsh(M, overwrite_a=True, check_finite=False)  # reads the lower triangle
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())  # clip: rounding can make zero eigenvalues negative


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D), any float dtype (used as float64)."""
    mu1, sigma1 = check_gaussian(mu1, sigma1, "first statistics")
    mu2, sigma2 = check_gaussian(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise NeonError(f"Fréchet distance: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); "
                        "were both statistics made with the same detector?")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


# How sigma is estimated from N features: 'unbiased' (np.cov's convention, the reference statistics' and every
# report's), or 'neon_edm': the Neon repository's edm/cal_metrics_all.py:115, Σ = XᵀX/(N−1) − μμᵀ, which is the
# unbiased Σ + μμᵀ/(N−1) (about +0.012 FID at 10k images, +0.002 at 50k), offered to replay its sweep decisions.
COVARIANCES = ("unbiased", "neon_edm")


def gaussian_from_features(features, covariance: str = "unbiased") -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and covariance sigma (D, D), float64, of features (N, D): unbiased (np.cov's convention), or
    `covariance='neon_edm'` (see COVARIANCES)."""
    import torch

    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim != 2:
        raise NeonError(f"features: expected (N, D), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise NeonError(f"need at least 2 images to compute statistics, got {x.shape[0]}")
    x = x.to(torch.float64)
    mu = x.mean(0)
    xc = x - mu  # two-pass (centred) covariance: no cancellation, unlike Σx xᵀ/N − mu muᵀ
    sigma = (xc.T @ xc) / (x.shape[0] - 1)
    if covariance == "neon_edm":   # XᵀX/(N−1) − μμᵀ, written as the centred Σ plus its μμᵀ/(N−1) excess
        sigma = sigma + torch.outer(mu, mu) / (x.shape[0] - 1)
    elif covariance != "unbiased":
        raise NeonError(f"covariance: {covariance!r} is not one of {', '.join(COVARIANCES)}")
    return mu.cpu().numpy(), sigma.cpu().numpy()
