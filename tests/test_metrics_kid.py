"""Kernel Inception Distance: torch-fidelity's numbers (its subsets, kernel, unbiased MMD², RNG) on the same
features."""
import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from neon.errors import NeonError
from neon.metrics import kid


def features(n_real, n_fake, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    real = torch.from_numpy(rng.standard_normal((n_real, dim)))
    fake = torch.from_numpy(rng.standard_normal((n_fake, dim)) * 1.1 + 0.2)
    return real, fake


def torch_fidelity_kid(real, fake, **kwargs):
    out = kid_features_to_metric(fake, real, verbose=False, **kwargs)  # its input1 is the generated set
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


@pytest.mark.parametrize("n_real, n_fake, subsets, subset_size", [
    (40, 30, 10, 20),   # subsets smaller than both sets
    (25, 25, 7, 25),    # subset = the whole set: every subset is a permutation
    (60, 45, 5, 45),    # subset = all of the smaller set
])
def test_kid_equals_torch_fidelity(n_real, n_fake, subsets, subset_size):
    real, fake = features(n_real, n_fake, seed=n_real)
    ours = kid(real, fake, subsets=subsets, subset_size=subset_size)
    mean, std = torch_fidelity_kid(real, fake, kid_subsets=subsets, kid_subset_size=subset_size)
    assert ours["kid_mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert ours["kid_std"] == pytest.approx(std, rel=1e-9, abs=1e-12)
    assert ours["kid_subset_size"] == subset_size
    assert mean > 0 and std > 0  # a shifted set: the comparison is not between two zeros


def test_kid_with_default_subsets_equals_torch_fidelity():
    real, fake = features(1000, 1000, dim=8, seed=3)
    ours = kid(real, fake)
    mean, std = torch_fidelity_kid(real, fake)  # kid_subsets 100, kid_subset_size 1000, rng_seed 2020
    assert (ours["kid_mean"], ours["kid_std"]) == pytest.approx((mean, std), rel=1e-9)


def test_fewer_samples_than_the_subset_size_use_the_smaller_set_whole():
    real, fake = features(30, 18, seed=5)
    ours = kid(real, fake, subsets=6, subset_size=1000)
    # torch-fidelity refuses; its answer at the size we fall back to is the reference.
    with pytest.raises(ValueError, match="subset size"):
        torch_fidelity_kid(real, fake, kid_subsets=6, kid_subset_size=1000)
    mean, std = torch_fidelity_kid(real, fake, kid_subsets=6, kid_subset_size=18)
    assert ours["kid_subset_size"] == 18
    assert (ours["kid_mean"], ours["kid_std"]) == pytest.approx((mean, std), rel=1e-9)


def test_float32_features_agree_with_torch_fidelity_to_float_precision():
    real, fake = features(50, 50, dim=64, seed=7)
    real, fake = real.float(), fake.float()  # torch-fidelity computes the kernels in the features' float32
    ours = kid(real, fake, subsets=5, subset_size=40)
    mean, std = torch_fidelity_kid(real, fake, kid_subsets=5, kid_subset_size=40)
    assert ours["kid_mean"] == pytest.approx(mean, rel=1e-3)


def test_a_different_seed_draws_different_subsets():
    real, fake = features(40, 40, seed=9)
    a, b = kid(real, fake, subsets=4, subset_size=10), kid(real, fake, subsets=4, subset_size=10, seed=1)
    assert a["kid_mean"] != b["kid_mean"]
    mean, _ = torch_fidelity_kid(real, fake, kid_subsets=4, kid_subset_size=10, rng_seed=1)
    assert b["kid_mean"] == pytest.approx(mean, rel=1e-9)


def test_identical_sets_score_near_zero_and_a_shift_scores_more():
    real, _ = features(200, 1, dim=16, seed=11)
    same = kid(real, real.clone(), subsets=20, subset_size=100)["kid_mean"]
    shifted = kid(real, real + 0.5, subsets=20, subset_size=100)["kid_mean"]
    assert abs(same) < 0.1 * shifted


def test_refusals():
    x = np.zeros((10, 4))
    with pytest.raises(NeonError, match="4-d, fake ones 3-d"):
        kid(x, np.zeros((10, 3)))
    with pytest.raises(NeonError, match="at least 2 real and 2 fake"):
        kid(x, np.zeros((1, 4)))
    with pytest.raises(NeonError, match="subsets must be at least 1"):
        kid(x, x, subsets=0)
    with pytest.raises(NeonError, match=r"must be \(N, D\)"):
        kid(np.zeros(4), x)
