"""EDM's augmentation pipe: what it does to images and what it tells the network (augment_labels)."""
from __future__ import annotations

import math

import pytest
import torch

from edm.augment import TRAIN_PY_ARGS, AugmentPipe
from neon.errors import NeonError


def _smooth_images(n=4, size=32):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    waves = [torch.cos(2 * math.pi * f * xx / size) * torch.sin(2 * math.pi * g * yy / size)
             for f, g in ((1, 1), (1, 2), (2, 1))]
    return torch.stack(waves)[None].repeat(n, 1, 1, 1).float()


def _blob(size=32, center=15.5, width=3.0):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    g = torch.exp(-((xx - center) ** 2 + (yy - center) ** 2) / (2 * width ** 2))
    return g[None, None].repeat(1, 3, 1, 1)


def _center_of_mass(images):
    w = images[:, 0].clamp(min=0)
    H, W = w.shape[-2:]
    ys, xs = torch.arange(H, dtype=w.dtype), torch.arange(W, dtype=w.dtype)
    total = w.sum(dim=(1, 2))
    return (w.sum(1) * xs).sum(1) / total, (w.sum(2) * ys).sum(1) / total


def test_train_py_pipe_gives_nine_labels_per_image():
    images, labels = AugmentPipe(p=0.12, **TRAIN_PY_ARGS)(torch.rand(16, 3, 16, 16) * 2 - 1)
    assert images.shape == (16, 3, 16, 16) and labels.shape == (16, 9) and labels.dtype == torch.float32


def test_probability_zero_leaves_images_unchanged_and_labels_zero():
    images = _smooth_images()
    out, labels = AugmentPipe(p=0, **TRAIN_PY_ARGS)(images)
    assert torch.equal(labels, torch.zeros_like(labels))
    assert (out - images).abs().max() < 1e-5   # the resampling chain is the identity for a zero transform


def test_flip_labels_say_which_images_were_flipped():
    torch.manual_seed(0)
    images = torch.rand(32, 3, 8, 8)
    out, labels = AugmentPipe(p=1, xflip=1, yflip=1)(images)
    expected = torch.where(labels[:, 0, None, None, None] == 1, images.flip(3), images)
    expected = torch.where(labels[:, 1, None, None, None] == 1, expected.flip(2), expected)
    assert torch.equal(out, expected)
    assert 0 < labels[:, 0].sum() < 32 and 0 < labels[:, 1].sum() < 32


def test_translation_moves_content_by_the_labelled_amount():
    torch.manual_seed(1)
    pipe = AugmentPipe(p=1, translate_frac=1, translate_frac_std=0.05)
    images = _blob().repeat(8, 1, 1, 1)
    out, labels = pipe(images)
    x0, y0 = _center_of_mass(images)
    x1, y1 = _center_of_mass(out)
    size = images.shape[-1]
    assert torch.allclose(x1 - x0, labels[:, 0] * size * 0.05, atol=0.05)
    assert torch.allclose(y1 - y0, labels[:, 1] * size * 0.05, atol=0.05)


def test_same_seed_same_augmentation():
    images = torch.rand(8, 3, 16, 16)
    torch.manual_seed(5)
    a = AugmentPipe(p=0.5, **TRAIN_PY_ARGS)(images)
    torch.manual_seed(5)
    b = AugmentPipe(p=0.5, **TRAIN_PY_ARGS)(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_augmentations_edm_never_uses_are_refused():
    with pytest.raises(NeonError, match="brightness"):
        AugmentPipe(p=0.1, brightness=1)
