"""The architectures and preconditioners the fixtures do not cover (NCSN++, skip encoders/decoders, VE, iDDPM)."""
from __future__ import annotations

import pytest
import torch

from edm import networks

NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])   # EDM train.py --arch=ncsnpp
SKIP = dict(model_type="SongUNet", encoder_type="skip", decoder_type="skip")
ADM = dict(model_type="DhariwalUNet")
SMALL = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9)
CASES = [(p, arch) for p in networks.PRECONDS for arch in ("ncsnpp", "skip", "adm")]


def _build(precond, arch, label_dim=10):
    kwargs = dict(SMALL, **{"ncsnpp": NCSNPP, "skip": SKIP, "adm": ADM}[arch])
    torch.manual_seed(0)
    return networks.PRECONDS[precond](img_resolution=8, img_channels=3, label_dim=label_dim, **kwargs).eval()


@pytest.mark.parametrize("precond,arch", CASES, ids=[f"{p}-{a}" for p, a in CASES])
def test_denoiser_output_has_the_input_shape_and_is_finite(precond, arch):
    net = _build(precond, arch)
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 5.0]).clamp(net.sigma_min, net.sigma_max)
    with torch.no_grad():
        D = net(x, sigma, torch.eye(10)[[1, 2]], augment_labels=torch.zeros(2, 9))
    assert D.shape == x.shape and D.dtype == torch.float32 and torch.isfinite(D).all()


def test_ncsnpp_has_fourier_features_and_residual_encoder_skips():
    keys = _build("VEPrecond", "ncsnpp").state_dict()
    assert "model.map_noise.freqs" in keys
    assert any("aux_residual" in k for k in keys)


@pytest.mark.parametrize("arch", ["ncsnpp", "skip", "adm"])
def test_each_image_is_denoised_independently_of_the_batch(arch):
    net = _build("EDMPrecond", arch)
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.eye(10)[[0, 5, 9]]
    with torch.no_grad():
        batch = net(x, sigma, labels)
        alone = net(x[1:2], sigma[1:2], labels[1:2])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)


def test_vp_and_iddpm_report_their_supported_noise_range():
    vp = _build("VPPrecond", "skip")
    assert vp.sigma_min == pytest.approx(0.000976, rel=1e-3) and vp.sigma_max == pytest.approx(152.17, rel=1e-4)
    iddpm = _build("iDDPMPrecond", "adm")
    assert iddpm.sigma_min < iddpm.sigma_max and torch.equal(iddpm.round_sigma(iddpm.u[5:6]), iddpm.u[5:6])
