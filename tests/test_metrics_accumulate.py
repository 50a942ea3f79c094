"""FeatureAccumulator: streaming batches, index order restored, refusals; evaluate() from image batches."""
import numpy as np
import pytest
import torch

from neon.errors import NeonError
from neon.metrics import (
    FeatureAccumulator,
    Stats,
    evaluate,
    frechet_distance,
    gaussian_from_features,
    inception_score,
    prdc,
    to_nchw_uint8,
)


class PixelExtractor:
    """Stands in for the Inception network (same interface): pool = the first 8 pixel values of the image,
    logits = a fixed linear map of them, so which image gave which row can be checked."""
    dim, logits, device = 8, True, torch.device("cpu")

    def __call__(self, images):
        pool = to_nchw_uint8(images).flatten(1)[:, :8].float()
        return {"pool": pool, "logits_unbiased": pool @ torch.linspace(-1, 1, 8 * 1008).view(8, 1008) / 50}


def images_and_features(n, seed=0):
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return images, PixelExtractor()(images)


def test_index_restores_image_order():
    images, feats = images_and_features(13)
    acc = FeatureAccumulator(PixelExtractor(), keep_features=True)
    order = np.random.default_rng(0).permutation(13)
    for chunk in np.array_split(order, 4):        # batches arrive out of order, as from several ranks
        acc.update(images[chunk], index=chunk)
    summary = acc.finish()
    assert summary.count == 13
    assert torch.equal(summary.features, feats["pool"])
    torch.testing.assert_close(summary.logits, feats["logits_unbiased"])  # matmul rounding depends on batch size
    mu, sigma = gaussian_from_features(feats["pool"])
    np.testing.assert_array_equal(summary.mu, mu)
    np.testing.assert_allclose(summary.sigma, sigma, rtol=1e-12)
    assert summary.inception_score(splits=2) == pytest.approx(inception_score(feats["logits_unbiased"], splits=2))


def test_without_index_rows_keep_arrival_order():
    images, feats = images_and_features(5)
    acc = FeatureAccumulator(PixelExtractor(), keep_features=True, logits=False)
    acc.update(images[:2])
    acc.update(images[2:])
    summary = acc.finish()
    assert torch.equal(summary.features, feats["pool"]) and summary.logits is None


def test_refusals():
    images, _ = images_and_features(4)
    cases = [
        ([(images[:2], [0, 1]), (images[2:], [1, 3])], "same position"),
        ([(images[:2], [0, 1]), (images[2:], None)], "for every batch"),
        ([(images[:1], [0])], "at least 2"),
    ]
    for batches, message in cases:
        acc = FeatureAccumulator(PixelExtractor())
        for batch, index in batches:
            acc.update(batch, index=index)
        with pytest.raises(NeonError, match=message):
            acc.finish()
    with pytest.raises(NeonError, match="non-negative"):
        FeatureAccumulator(PixelExtractor()).update(images[:2], index=[0, -1])


def test_evaluate_from_batches_with_reference_and_prdc():
    images, feats = images_and_features(24, seed=1)
    real_images, real = images_and_features(20, seed=2)
    ref = gaussian_from_features(real["pool"])
    out = evaluate(iter(images.split(5)), Stats(*ref), extractor=PixelExtractor(), splits=4, real=real["pool"], k=3)
    assert out["num_images"] == 24
    assert out["fid"] == pytest.approx(frechet_distance(*gaussian_from_features(feats["pool"]), *ref), rel=1e-12)
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(feats["logits_unbiased"], splits=4))
    assert {k: out[k] for k in ("precision", "recall", "density", "coverage")} == prdc(real["pool"], feats["pool"], 3)
    with pytest.raises(NeonError, match="are 4-d but the detector gives 8-d"):
        evaluate(iter(images.split(5)), Stats(np.zeros(4), np.eye(4)), extractor=PixelExtractor())
