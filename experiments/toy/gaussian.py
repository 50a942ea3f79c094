"""The target of the toy: a 2-D Gaussian, its training sets, and the closed-form Fréchet distance ("FID").

In two dimensions the generated points are their own features, so FID is the Fréchet distance between the
Gaussian fitted to the samples (mean, covariance) and the true one — no Inception network involved.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

MU = (0.0, 0.0)                    # true mean
SIGMA = ((2.0, 1.0), (1.0, 2.0))   # true covariance


def target() -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of the true distribution as float64 arrays of shape (2,) and (2, 2)."""
    return np.array(MU, dtype=np.float64), np.array(SIGMA, dtype=np.float64)


def training_set(n: int, data_seed: int) -> torch.Tensor:
    """n real training points, (n, 2) float32.

    Drawn as the official notebook does (numpy's legacy generator seeded with `data_seed`, then
    `multivariate_normal`), because which 1000 (or 100) points a base model sees decides how far off it is —
    and so which way merging can help. Keep `data_seed` fixed (42) and vary the run seed.
    """
    mu, sigma = target()
    x = np.random.RandomState(data_seed).multivariate_normal(mu, sigma, n)
    return torch.from_numpy(x.astype(np.float32))


def fresh_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    """n fresh draws from the true Gaussian, (n, 2) float32: x = μ + L z with Σ = L Lᵀ."""
    mu, sigma = target()
    L = torch.from_numpy(np.linalg.cholesky(sigma)).float()
    z = torch.randn(n, 2, generator=generator)
    return torch.from_numpy(mu).float() + z @ L.T


def stage_generator(seed: int, *tags: object) -> torch.Generator:
    """A torch.Generator for one stage of the run, e.g. stage_generator(0, "diffusion", "synthetic", 1.1).

    Every stage draws from its own stream, so changing one stage's sizes never shifts another's random numbers.
    """
    key = zlib.crc32("/".join(str(t) for t in tags).encode())
    state = np.random.SeedSequence([int(seed), key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean (2,) and unbiased covariance (2, 2) of x: (N, 2), both float64."""
    x = x.double()
    mu = x.mean(0)
    d = x - mu
    sigma = d.T @ d / (x.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def frechet_distance_2d(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) for 2 × 2 covariances, in closed form.

    Σ1 Σ2 is similar to a PSD matrix, so its eigenvalues λ1, λ2 are real and ≥ 0 and
    tr (Σ1 Σ2)^½ = √λ1 + √λ2 = √(tr(Σ1 Σ2) + 2 √det(Σ1 Σ2)) — no matrix square root needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if not (np.isfinite(mu1).all() and np.isfinite(sigma1).all()):
        return math.inf
    m = sigma1 @ sigma2
    det = max(float(np.linalg.det(m)), 0.0)   # ≥ 0 in exact arithmetic; clip rounding
    tr_sqrt = math.sqrt(max(float(np.trace(m)) + 2.0 * math.sqrt(det), 0.0))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)


def fid(x: torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fitted to samples x: (N, 2) and the true N(μ, Σ)."""
    if not torch.isfinite(x).all():
        return math.inf
    return frechet_distance_2d(*moments(x), *target())


BLOCK = 64   # rows per partial sum in sums(): a fixed partition of the sample index, whatever the chunking


def sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial sums of K sample sets x: (K, n, 2), BLOCK rows at a time (n a multiple of BLOCK, or the last
    rows of the set): Σ x: (K, ⌈n/BLOCK⌉, 2) and Σ x xᵀ: (K, ⌈n/BLOCK⌉, 2, 2), float64.

    Concatenated over chunks and reduced by fid_from_sums, they give each set's FID without holding its
    samples, and the same FID to the last bit however the rows were chunked or stacked.
    """
    K, n, _ = x.shape
    pad = -n % BLOCK                               # zero rows add nothing to the sums
    x = torch.cat([x.double(), x.new_zeros(K, pad, 2, dtype=torch.float64)], 1).view(K, -1, BLOCK, 2)
    return x.sum(2), torch.einsum("kmbi,kmbj->kmij", x, x)


def fid_from_sums(n: int, s1: torch.Tensor, s2: torch.Tensor) -> float:
    """fid() of one sample set of n samples from its partial sums() concatenated: s1: (M, 2), s2: (M, 2, 2).
    A non-finite sample makes the sums non-finite, and the FID infinite, as in fid()."""
    s1, s2 = s1.contiguous().sum(0), s2.contiguous().sum(0)
    if not (torch.isfinite(s1).all() and torch.isfinite(s2).all()):
        return math.inf
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    return frechet_distance_2d(mu.numpy(), sigma.numpy(), *target())
