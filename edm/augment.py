"""EDM's non-leaking augmentation pipeline (Karras et al. 2022, Appendix F.2), as the official training uses it.

Every released EDM model was trained with `train.py --augment=p` (p = 0.12 CIFAR-10, 0.15 FFHQ): each image is
x-flipped with probability 1/2, and y-flipped, isotropically scaled, rotated, anisotropically scaled and
translated each with probability p. The network sees the 9 transform parameters as `augment_labels`
(its `map_augment` input, augment_dim = 9), so it learns to produce augmented images only when asked to; at
sampling time the labels are absent (= zero) and it produces clean images.

Fine-tuning without the pipe would change what θs learns: (1) `map_augment.weight` gets no gradient and stays
at its released value; (2) every training example is an un-augmented synthetic image with augment labels = None,
whereas with the pipe a share of them (1 − (1 − p)^5 of the images, 47% at p = 0.12, 56% at p = 0.15, besides
the 50% x-flips) are flipped / scaled / rotated / translated copies that the network is told about, and the loss
on those pulls θs towards the augmented distribution, not towards the synthetic set S. So the self-training
direction θs − θr, which Neon extrapolates against, would differ from the official one. The official Neon runs
keep the pipe on (CIFAR-10: train.py's default 0.12; FFHQ: --augment=0.15), so we implement it. (Un-augmented
images still pass through the 2x-upsample / resample / downsample chain; with a zero transform it is the
identity to about 1e-6.)

The official class has more augmentations (integer rotation/translation, colour); EDM's train.py never enables
them, so they are refused here rather than silently ignored. Random draws use the global torch RNG in the
official order, so the same seed gives the same transforms.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neon.errors import NeonError

# Symlet-6 low-pass filter taps (the wavelet filter used for 2x up/downsampling around the geometric transform).
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148]

# AugmentPipe arguments EDM's train.py sets (all others keep their defaults).
TRAIN_PY_ARGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


# ---------------------------------------------------------------------------------------------------------
# 3x3 homogeneous 2-D transforms. Entries are Python numbers or (N,) tensors; the result is (3, 3) or (N, 3, 3)
# float32.

def _matrix(rows, device=None) -> torch.Tensor:
    elems = [x for row in rows for x in row]
    ref = next((x for x in elems if isinstance(x, torch.Tensor)), None)
    if ref is None:
        return torch.as_tensor(rows, dtype=torch.float32, device=device)
    elems = [x if isinstance(x, torch.Tensor) else torch.full(ref.shape, float(x), dtype=torch.float32,
                                                                 device=ref.device) for x in elems]
    return torch.stack(elems, dim=-1).reshape(ref.shape + (len(rows), -1))


def translate2d(tx, ty, device=None):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], device)


def scale2d(sx, sy, device=None):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], device)


def rotate2d(theta, device=None):
    return _matrix([[torch.cos(theta), torch.sin(-theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1]],
                   device)


def translate2d_inv(tx, ty, device=None):
    return translate2d(-tx, -ty, device)


def scale2d_inv(sx, sy, device=None):
    return scale2d(1 / sx, 1 / sy, device)


def rotate2d_inv(theta, device=None):
    return rotate2d(-theta, device)


# ---------------------------------------------------------------------------------------------------------

class AugmentPipe:
    """images (N, C, H, W) float in [-1, 1] -> (augmented images, augment_labels (N, 9) float32).

    The arguments are the official ones (probability multipliers times the overall probability p, and the
    transforms' spreads); `AugmentPipe(p, **TRAIN_PY_ARGS)` is what EDM's train.py builds.
    """

    _UNSUPPORTED = ("rotate_int", "translate_int", "brightness", "contrast", "lumaflip", "hue", "saturation")

    def __init__(self, p: float = 1,
                 xflip: float = 0, yflip: float = 0, rotate_int: float = 0, translate_int: float = 0,
                 translate_int_max: float = 0.125,
                 scale: float = 0, rotate_frac: float = 0, aniso: float = 0, translate_frac: float = 0,
                 scale_std: float = 0.2,            # log2 std of isotropic scaling
                 rotate_frac_max: float = 1,        # rotation range, 1 = full circle
                 aniso_std: float = 0.2,            # log2 std of anisotropic scaling
                 aniso_rotate_prob: float = 0.5,    # probability of scaling along a rotated frame
                 translate_frac_std: float = 0.125, # std of translation, relative to the image size
                 brightness: float = 0, contrast: float = 0, lumaflip: float = 0, hue: float = 0,
                 saturation: float = 0, **_colour_spreads):
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        given = dict(rotate_int=rotate_int, translate_int=translate_int, brightness=brightness, contrast=contrast,
                     lumaflip=lumaflip, hue=hue, saturation=saturation)
        unsupported = [k for k in self._UNSUPPORTED if float(given[k]) != 0]
        if unsupported:
            raise NeonError(f"AugmentPipe: {', '.join(unsupported)} are not implemented (EDM's train.py never "
                            "enables them)")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting: flips (the x-flip multiplier 1e8 makes it a fair coin for every image).
        for enabled, dim in ((self.xflip, 3), (self.yflip, 2)):
            if enabled > 0:
                w = torch.randint(2, [N, 1, 1, 1], device=device)
                w = torch.where(torch.rand([N, 1, 1, 1], device=device) < enabled * self.p, w, torch.zeros_like(w))
                images = torch.where(w == 1, images.flip(dim), images)
                labels += [w]

        # Geometric transforms, composed as one inverse matrix G_inv (output pixel -> input pixel).
        I_3 = torch.eye(3, device=device)
        G_inv = I_3
        if self.scale > 0:
            w = torch.randn([N], device=device)
            w = torch.where(torch.rand([N], device=device) < self.scale * self.p, w, torch.zeros_like(w))
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels += [w]
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (math.pi * self.rotate_frac_max)
            w = torch.where(torch.rand([N], device=device) < self.rotate_frac * self.p, w, torch.zeros_like(w))
            G_inv = G_inv @ rotate2d_inv(-w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * math.pi
            w = torch.where(torch.rand([N], device=device) < self.aniso * self.p, w, torch.zeros_like(w))
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = torch.randn([2, N], device=device)
            w = torch.where(torch.rand([1, N], device=device) < self.translate_frac * self.p, w, torch.zeros_like(w))
            G_inv = G_inv @ translate2d_inv(w[0].mul(W * self.translate_frac_std),
                                            w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]
        if G_inv is not I_3:  # runs whenever a geometric transform is enabled, even if none was drawn
            images = _warp(images, G_inv)

        return images, torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)


def _warp(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Apply G_inv (N, 3, 3) with 2x-oversampled bilinear resampling, reflect padding and sym6 filtering."""
    N, C, H, W = images.shape
    device = images.device
    cx, cy = (W - 1) / 2, (H - 1) / 2
    Hz = torch.tensor(SYM6, dtype=torch.float32)
    Hz_pad = len(SYM6) // 4

    # Reflect-pad enough that the transformed image corners stay inside the padded input.
    corners = _matrix([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device)     # (4, xyz)
    corners = G_inv @ corners.t()                                                              # (N, xyz, 4)
    margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)                                     # (xy, N*4)
    margin = torch.cat([-margin, margin]).max(dim=1).values                                    # [x0, y0, x1, y1]
    margin = margin + torch.as_tensor([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, dtype=torch.float32, device=device)
    margin = margin.max(torch.zeros(4, device=device))
    margin = margin.min(torch.as_tensor([W - 1, H - 1] * 2, dtype=torch.float32, device=device))
    mx0, my0, mx1, my1 = margin.ceil().to(torch.int32)
    images = F.pad(input=images, pad=[int(mx0), int(mx1), int(my0), int(my1)], mode="reflect")
    G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv

    # Upsample 2x: zero-stuff, then filter rows and columns with the (flipped) sym6 taps.
    weight = Hz.flip(0).to(images.dtype).to(device)[None, None, :].tile([C, 1, 1])
    pad = (len(SYM6) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = F.conv2d(images, weight.unsqueeze(2), groups=C, padding=[0, pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    images = F.conv2d(images, weight.unsqueeze(3), groups=C, padding=[pad, 0])
    G_inv = scale2d(2, 2, device) @ G_inv @ scale2d_inv(2, 2, device)
    G_inv = translate2d(-0.5, -0.5, device) @ G_inv @ translate2d_inv(-0.5, -0.5, device)

    # Resample bilinearly on the 2x grid.
    shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
    G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], device) @ G_inv
             @ scale2d_inv(2 / shape[3], 2 / shape[2], device))
    grid = F.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Downsample 2x with the sym6 taps and crop the padding.
    weight = Hz.to(images.dtype).to(device)[None, None, :].tile([C, 1, 1])
    pad = (len(SYM6) - 1) // 2
    images = F.conv2d(images, weight.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad:-Hz_pad]
    images = F.conv2d(images, weight.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad:-Hz_pad, :]
    return images
