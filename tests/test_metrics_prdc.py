"""Precision, recall, density, coverage (k-NN balls, the prdc package's definitions; the paper used k = 5)."""
import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import calculate_precision_recall_full

from neon.errors import NeonError
from neon.metrics import prdc


def prdc_by_definition(real, fake, k):
    """Naeem et al. 2020 written out with full distance matrices."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    return {
        "precision": np.mean([(d[:, j] < r_real).any() for j in range(len(fake))]),
        "recall": np.mean([(d[i] < r_fake).any() for i in range(len(real))]),
        "density": np.mean([(d[:, j] < r_real).sum() for j in range(len(fake))]) / k,
        "coverage": np.mean([d[i].min() < r_real[i] for i in range(len(real))]),
    }


@pytest.mark.parametrize("k, block", [(5, 1024), (3, 7)])
def test_prdc_matches_its_definition(k, block):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((60, 16))
    fake = rng.standard_normal((50, 16)) * 1.3 + 0.4
    ours = prdc(real, fake, k=k, block=block)
    ref = prdc_by_definition(real, fake, k)
    assert ours == pytest.approx(ref, abs=1e-12)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1  # a pair where every term is exercised


def test_precision_recall_equal_torch_fidelity():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.standard_normal((80, 32)))
    fake = torch.from_numpy(rng.standard_normal((70, 32)) * 0.8 + 0.3)
    precision, recall = calculate_precision_recall_full(fake, real, neighborhood=5)  # its input1 = generated
    ours = prdc(real, fake, k=5)
    # Same fractions; torch-fidelity averages in float32. Distances here are never tied, so its `<=` and
    # prdc's `<` agree.
    assert ours["precision"] == pytest.approx(precision, abs=1e-6)
    assert ours["recall"] == pytest.approx(recall, abs=1e-6)
    assert 0 < precision < 1 and 0 < recall < 1


def test_a_set_against_itself_is_perfect():
    x = np.random.default_rng(1).standard_normal((40, 8))
    assert prdc(x, x, k=5) == pytest.approx({"precision": 1, "recall": 1, "density": 1, "coverage": 1})


def test_refusals():
    x = np.zeros((10, 4))
    with pytest.raises(NeonError, match="4-d, fake ones 3-d"):
        prdc(x, np.zeros((10, 3)))
    with pytest.raises(NeonError, match="more than k=5"):
        prdc(x, np.zeros((5, 4)))
