"""Features, FID and IS equal torch-fidelity's own on the same images with the same (random) weights."""
import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric

from neon.errors import NeonError
from neon.metrics import FeatureAccumulator, FeatureExtractor, evaluate, inception_score, save_stats, to_nchw_uint8
from neon.metrics.testing import random_compat_state_dict, random_images, save_random_compat_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Every InceptionV3 tensor random (seeded), saved in torch-fidelity's weight layout."""
    return str(save_random_compat_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0))


@pytest.fixture(scope="module")
def extractor(weights):
    return FeatureExtractor("inception-v3-compat", weights=weights, device="cpu")


@pytest.fixture(scope="module")
def fidelity(weights):
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=weights).eval()


@pytest.mark.parametrize("size", [(8, 8), (32, 32), (64, 48), (299, 299), (512, 512)])
def test_features_equal_torch_fidelity(extractor, fidelity, size):
    images = random_images(1, *size, seed=size[0])                 # NHWC uint8
    ours = extractor(images)
    with torch.inference_mode():
        pool, logits = fidelity(images.permute(0, 3, 1, 2).contiguous())
    assert ours["pool"].shape == (1, 2048) and ours["logits_unbiased"].shape == (1, 1008)
    torch.testing.assert_close(ours["pool"], pool, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours["logits_unbiased"], logits, rtol=1e-6, atol=1e-6)


def test_layouts_and_batching_give_the_same_features(weights, extractor):
    nhwc = random_images(2, 20, 24, seed=1)
    ref = extractor(nhwc)["pool"]
    for variant in (nhwc.permute(0, 3, 1, 2), nhwc.numpy()):
        torch.testing.assert_close(extractor(variant)["pool"], ref, rtol=1e-6, atol=1e-7)
    one_at_a_time = FeatureExtractor(weights=weights, device="cpu", max_batch=1)
    torch.testing.assert_close(one_at_a_time(nhwc)["pool"], ref, rtol=1e-5, atol=1e-6)


def test_grey_images_are_repeated_to_rgb():
    grey = random_images(2, 10, 12, seed=2)[..., :1]
    assert torch.equal(to_nchw_uint8(grey), grey.permute(0, 3, 1, 2).expand(-1, 3, -1, -1))
    assert torch.equal(to_nchw_uint8(grey[..., 0]), to_nchw_uint8(grey))


def test_bad_images_are_refused():
    with pytest.raises(NeonError, match="uint8"):
        to_nchw_uint8(torch.zeros(2, 8, 8, 3))
    with pytest.raises(NeonError, match="NHWC from NCHW"):
        to_nchw_uint8(torch.zeros(2, 3, 8, 3, dtype=torch.uint8))
    with pytest.raises(NeonError, match="NHWC from NCHW"):
        to_nchw_uint8(torch.zeros(2, 8, 8, 4, dtype=torch.uint8))


class _Images(torch.utils.data.Dataset):
    """torch-fidelity's input: a Dataset of uint8 (3, H, W) tensors."""

    def __init__(self, images):
        self.images = images.permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def exact_fid(feats1, feats2):
    """FID of two small feature sets without any D×D square root: with Σ = XᵀX/(n−1) for centred X,
    tr (Σ1Σ2)^½ is the sum of the singular values of X1 X2ᵀ / √((n1−1)(n2−1))."""
    x1, x2 = feats1.double().numpy(), feats2.double().numpy()
    d = x1.mean(0) - x2.mean(0)
    x1, x2 = x1 - x1.mean(0), x2 - x2.mean(0)
    n1, n2 = len(x1) - 1, len(x2) - 1
    tr_sqrt = np.linalg.svd(x1 @ x2.T / np.sqrt(n1 * n2), compute_uv=False).sum()
    return d @ d + (x1 * x1).sum() / n1 + (x2 * x2).sum() / n2 - 2 * tr_sqrt


def test_fid_and_is_equal_torch_fidelity_calculate_metrics(weights, extractor, tmp_path):
    fake, real = random_images(8, 32, 32, seed=10), random_images(6, 24, 24, seed=11)
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(fake), input2=_Images(real), fid=True, isc=True, isc_splits=2, cuda=False, batch_size=4,
        feature_extractor_weights_path=weights, verbose=False, save_cpu_ram=True, cache=False)

    ref = FeatureAccumulator(extractor, logits=False, keep_features=True)
    for chunk in real.split(4):
        ref.update(chunk)
    ref = ref.finish()
    save_stats(tmp_path / "ref.npz", ref.mu, ref.sigma, count=ref.count)
    acc = FeatureAccumulator(extractor, keep_features=True)
    for chunk in fake.split(3):
        acc.update(chunk)
    summary = acc.finish()
    ours = evaluate(summary, tmp_path / "ref.npz", splits=2)
    assert ours["num_images"] == 8
    # With 8 and 6 samples in 2048-d the covariances have rank 7 and 5: torch-fidelity's eigvals(Σ1Σ2) (like
    # sqrtm) then carries ~2e-5 relative error from the 2040 null directions; ours is exact to ~1e-8.
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["fid"] == pytest.approx(exact_fid(summary.features, ref.features), rel=1e-7)
    # Logits differ in the last bits with the batch split (matmul blocking); IS carries that through.
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4)
    assert ours["is_mean"] > 1.01  # the random logits do differ between images: the comparison has teeth


@pytest.mark.parametrize("n, splits", [(1000, 10), (57, 10), (40, 3)])
def test_inception_score_equals_torch_fidelity(n, splits):
    logits = torch.randn(n, 1008, generator=torch.Generator().manual_seed(n)) * 3
    theirs = isc_features_to_metric(logits, splits=splits)
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    logits = torch.full((40, 8), -40.0)
    logits[torch.arange(40), torch.arange(40) % 4] = 0.0   # each image sure of one of 4 classes, equally often
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(4.0, rel=1e-9) and std == 0


def test_weights_without_logits_report_is_unavailable(tmp_path, weights):
    state = random_compat_state_dict(seed=0)
    state["fc.weight"].fill_(float("nan"))   # what the fid-helper conversion writes
    state["fc.bias"].fill_(float("nan"))
    torch.save(state, tmp_path / "pool_only.pth")
    pool_only = FeatureExtractor(weights=tmp_path / "pool_only.pth", device="cpu")
    assert not pool_only.has_logits and set(pool_only(random_images(1, 8, 8))) == {"pool"}
    acc = FeatureAccumulator(pool_only)
    acc.update(random_images(3, 8, 8, seed=3))
    result = evaluate(acc, None, splits=2)  # enough images for 2 splits: only the logits are missing
    assert result["is_mean"] is None and result["is_std"] is None and result["fid"] is None
    assert result["is_unavailable"].startswith("no logits")


def test_weights_file_with_code_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(1), "extra": np.random.default_rng(0)}, tmp_path / "code.pth")
    with pytest.raises(NeonError, match="not a plain InceptionV3 state dict"):
        FeatureExtractor(weights=tmp_path / "code.pth", device="cpu")
    with pytest.raises(NeonError, match="not found"):
        FeatureExtractor(weights=tmp_path / "missing.pth", device="cpu")
    with pytest.raises(NeonError, match="unknown detector"):
        FeatureExtractor("clip", device="cpu")
