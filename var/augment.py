"""VAR's training augmentation, split into the part that can be cached and the part drawn every step.

The official fine-tuning (SinaAlemohammad/Neon @76496c3 VAR/VAR_imagenet_256/utils/data.py, the same file in
VAR_imagenet_512 and FoundationVision/VAR @78b9539 utils/data.py `build_dataset`) reads every synthetic PNG at
every step through

    [RandomHorizontalFlip()]  (only with --hflip; Neon's scripts leave it off, arg_util hflip=False)
    Resize(round(mid_reso · final_reso), LANCZOS)     mid_reso = 1.125; on the PIL image, shorter side
    RandomCrop((final_reso, final_reso))
    ToTensor(), normalize_01_into_pm1                  x/255, then x + x - 1

and VQ-encodes the result. The Lanczos resize is deterministic, so `lanczos_resize` runs once per image and the
core caches its uint8 output; `random_crop` and `to_pm1` run every step on the cached images. Random draws come
from the global torch RNG, per image, in torchvision's order (flip, crop row, crop column), so the same seed gives
the same crops as the official transform applied to the same images in the same order. The flip is applied after
the resize here: PIL's Lanczos filter is mirror-symmetric, so flip∘resize = resize∘flip (tests/test_var_augment.py
checks the whole chain against torchvision bit for bit).
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from neon.errors import NeonError

MID_RESO = 1.125   # utils/data.py build_dataset(mid_reso=1.125); arg_util mid_reso: float = 1.125


def mid_size(height: int, width: int, final_reso: int, mid_reso: float = MID_RESO) -> tuple[int, int]:
    """(H, W) after torchvision's Resize(round(mid_reso · final_reso)): the shorter side becomes that size, the
    longer one int(size · long / short) (torchvision.transforms.functional._compute_resized_output_size)."""
    size = round(mid_reso * final_reso)
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def lanczos_resize(images: torch.Tensor, final_reso: int, mid_reso: float = MID_RESO) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, H', W', 3) (`mid_size`), PIL's Lanczos resize of each image as
    torchvision's Resize calls it on a PIL image (an image already at that size is returned unchanged)."""
    out = []
    for img in images.cpu().numpy():
        h, w = mid_size(img.shape[0], img.shape[1], final_reso, mid_reso)
        if (h, w) != img.shape[:2]:
            img = np.asarray(PIL.Image.fromarray(img).resize((w, h), PIL.Image.LANCZOS))
        out.append(torch.from_numpy(np.array(img)))
    if not out:
        return images.new_zeros((0, *mid_size(images.shape[1], images.shape[2], final_reso, mid_reso), 3))
    return torch.stack(out)


def _draw(n: int) -> int:
    """One draw in [0, n) from the global RNG, as torchvision's RandomCrop.get_params makes it."""
    return int(torch.randint(0, n, size=(1,)).item())


def random_crop(images: torch.Tensor, final_reso: int, hflip: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, C) on any device -> (B, final_reso, final_reso, C): per image, a flip with probability 0.5
    (hflip) and a crop at a uniformly drawn corner, drawn as RandomHorizontalFlip then RandomCrop would."""
    B, H, W = images.shape[:3]
    if H < final_reso or W < final_reso:
        raise NeonError(f"var: cannot crop {final_reso}x{final_reso} from {H}x{W} images")
    out = []
    for b in range(B):
        flip = hflip and bool(torch.rand(1) < 0.5)
        i, j = (0, 0) if (H, W) == (final_reso, final_reso) else (_draw(H - final_reso + 1), _draw(W - final_reso + 1))
        if flip:   # the official flip comes first: column j of the flipped image is column W - R - j of this one
            j = W - final_reso - j
        crop = images[b, i:i + final_reso, j:j + final_reso]
        out.append(crop.flip(1) if flip else crop)
    return torch.stack(out) if out else images[:, :final_reso, :final_reso]


_PM1 = None


def _pm1_table() -> torch.Tensor:
    """The 256 values ToTensor + normalize_01_into_pm1 give a uint8 pixel, computed on CPU as the official
    loader does (a CUDA division by a scalar multiplies by its reciprocal and may differ in the last bit)."""
    global _PM1
    if _PM1 is None:
        x = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
        _PM1 = x.add(x).add_(-1)
    return _PM1


def to_pm1(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1], bit-identical to ToTensor + normalize_01_into_pm1."""
    return _pm1_table().to(images.device)[images.long()].permute(0, 3, 1, 2).contiguous()
