"""Fréchet distance: exact against scipy.linalg.sqrtm (the ADM/EDM evaluators' formula), full rank and not."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from neon.errors import NeonError
from neon.metrics import frechet_distance, gaussian_from_features


def sqrtm_fid(mu1, sigma1, mu2, sigma2):
    """The reference formula: |Δmu|² + tr Σ1 + tr Σ2 − 2 tr sqrtm(Σ1 Σ2), real part."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular products
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


def gaussian(rng, n, dim, mixing=None, shift=0.0):
    """Sample statistics of n draws in dim dimensions (rank min(n − 1, dim)), optionally correlated/shifted."""
    x = rng.standard_normal((n, dim))
    if mixing is not None:
        x = x @ mixing
    return gaussian_from_features(x + shift)


PAIRS = {  # name: (n1, n2, correlate first, correlate second, shift of the second)
    "full-vs-full": (1500, 1500, False, True, 0.0),
    "rank-deficient-vs-full": (200, 1500, False, True, 0.1),
    "full-vs-rank-deficient": (1500, 300, True, False, 0.0),
    "both-rank-deficient": (250, 120, True, False, 0.2),
    "same-distribution": (1000, 1000, True, True, 0.0),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_frechet_distance_matches_scipy_sqrtm(name):
    n1, n2, corr1, corr2, shift = PAIRS[name]
    dim = 512
    rng = np.random.default_rng(list(PAIRS).index(name))
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    mu1, sigma1 = gaussian(rng, n1, dim, mixing if corr1 else None)
    mu2, sigma2 = gaussian(rng, n2, dim, mixing if corr2 else None, shift)
    ours, ref = frechet_distance(mu1, sigma1, mu2, sigma2), sqrtm_fid(mu1, sigma1, mu2, sigma2)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


def test_frechet_distance_2048d_rank_deficient_is_exact():
    # The case that matters: the covariance of 1k samples in 2048-d (rank 999) against a full-rank one. With
    # Σ1 = XᵀX/(n−1), the non-zero eigenvalues of Σ1Σ2 are those of the small X Σ2 Xᵀ/(n−1): an exact
    # reference free of any matrix square root (sqrtm itself is only good to ~1e-8 here; at 2048-d it takes
    # ~20-60 s on one core, so bench/bench_metrics.py makes that comparison instead).
    rng = np.random.default_rng(7)
    dim, n = 2048, 1000
    x = rng.standard_normal((n, dim))
    x -= x.mean(0)
    sigma1 = x.T @ x / (n - 1)
    mu2, sigma2 = gaussian_from_features(rng.standard_normal((2200, dim)) * rng.uniform(0.2, 2.0, dim) + 0.05)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(x @ sigma2 @ x.T / (n - 1)), 0, None)).sum()
    exact = mu2 @ mu2 + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(dim), sigma1, mu2, sigma2) == pytest.approx(exact, rel=1e-9)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = gaussian(rng, 300, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_gaussian_from_features_is_numpy_mean_and_cov():
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    mu, sigma = gaussian_from_features(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)


def test_refuses_mismatched_dimensions_and_bad_input():
    rng = np.random.default_rng(0)
    mu_a, s_a = gaussian(rng, 20, 8)
    mu_b, s_b = gaussian(rng, 20, 6)
    with pytest.raises(NeonError, match="dimensions differ"):
        frechet_distance(mu_a, s_a, mu_b, s_b)
    with pytest.raises(NeonError, match="expected mu"):
        frechet_distance(mu_a, s_a[:4], mu_a, s_a)
    with pytest.raises(NeonError, match="NaN"):
        frechet_distance(mu_a * np.nan, s_a, mu_a, s_a)
    with pytest.raises(NeonError, match="at least 2"):
        gaussian_from_features(np.ones((1, 8)))
