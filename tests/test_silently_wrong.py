"""Inputs that used to give a silently wrong result are refused in one line: a merge weight that overflows, a
covariance that is none, a 16-bit image read as white, optimizer and loss settings with the wrong sign, an EMA
half-life shorter than one image."""
import numpy as np
import pytest
import torch

from neon.errors import NeonError


def test_a_merge_weight_that_overflows_is_refused_and_writes_nothing(tmp_path):
    from neon.checkpoint import atomic_save
    from neon.merge import merge_files
    atomic_save({"w": torch.ones(4), "mask": torch.tensor([0.0, -float("inf")])}, str(tmp_path / "r.pth"))
    atomic_save({"w": -torch.ones(4), "mask": torch.tensor([0.0, -float("inf")])}, str(tmp_path / "s.pth"))
    with pytest.raises(NeonError, match=r"^merge weight w=1e\+308: w overflows to inf/NaN in its dtype$"):
        merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), 1e308, str(tmp_path / "n.pth"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pth", "s.pth"]
    merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), 0.5, str(tmp_path / "n.pth"))   # masks stay -inf


@pytest.mark.parametrize("sigma, why", [(-np.eye(3), "negative variance"), (np.triu(np.ones((3, 3))), "symmetric")])
def test_a_sigma_that_is_no_covariance_is_refused(tmp_path, sigma, why):
    from neon.metrics.frechet import check_gaussian
    with pytest.raises(NeonError, match=r"sigma is not a covariance"):
        check_gaussian(np.zeros(3), sigma, "ref.npz")
    check_gaussian(np.zeros(3), np.eye(3), "ref.npz")


def test_a_16_bit_png_is_refused_rather_than_clipped_to_white(tmp_path):
    from PIL import Image

    from neon.images import open_images
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, value in enumerate((1000, 30000)):
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(folder / f"{i}.png")
    with pytest.raises(NeonError, match=r"0\.png: a I;16 image \(more than 8 bits per channel\)"):
        open_images(str(folder)).read(0, 2)


@pytest.mark.parametrize("override, field", [({"grad_clip": -5}, "grad_clip"), ({"eps": -1}, "eps"),
                                             ({"weight_decay": [1]}, "weight_decay"), ({"betas": [2, 3]}, "betas")])
def test_optimizer_settings_out_of_range_are_refused(override, field):
    from neon.family import get_family
    from neon.selftrain import train_defaults
    with pytest.raises(NeonError, match=rf"^finetune.optimizer.{field}: "):
        train_defaults(get_family("tinypix"), override)


def test_an_ema_half_life_below_one_image_and_a_negative_snr_gamma_are_refused():
    from neon.config import FinetuneConfig
    from neon.selftrain import check_finetune_config
    with pytest.raises(NeonError, match=r"^finetune.ema: expected beta in \[0, 1\) or halflife_images of at least"):
        check_finetune_config(FinetuneConfig(ema={"halflife_images": 1e-300}))
    from neon.family import get_family
    family = get_family("diffusers")
    with pytest.raises(NeonError, match=r"^finetune.loss_args.snr_gamma: must be positive"):
        family.loss(family.tiny(), {}, snr_gamma=-1.0)
