"""DINOv2 ViT-L/14 features of uint8 images, exactly as EDM2 computes FD_DINOv2.

EDM2's detector (NVlabs/edm2@4bf8162 calculate_metrics.py `DINOv2Detector`, after layer6ai-labs/dgm-eval):
    x = bicubic resize to 224×224 ('torch': antialiased interpolate of the float 0..255 values, not rounded;
        'pil': PIL's BICUBIC on the uint8 image, the dgm-eval reference)
    x = (x / 255 − ImageNet mean) / ImageNet std
    features = dinov2_vitl14(x)          # the final norm's class token, (B, 1024)
The network is timm's VisionTransformer with DINOv2's settings (facebookresearch/dinov2@b8931f7
dinov2/hub/backbones.py `_make_dinov2_model`: img_size 518, patch 14, LayerScale init_values 1.0, MLP FFN,
LayerNorm eps 1e-6, no registers) and DINOv2's own position-embedding interpolation (below): nothing from
torch.hub, no code from any file. The weights are the official `dinov2_vitl14_pretrain.pth`, a plain state dict
read with the restricted unpickler (neon.checkpoint) and loaded strictly.
"""
from __future__ import annotations

import math
import os
from functools import partial

import numpy as np
import PIL.Image
import torch

from neon import checkpoint, paths
from neon.errors import NeonError

RESOLUTION = 224                        # EDM2 resizes every image to 224×224 (16×16 patches of 14)
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # EDM2 calculate_metrics.py DINOv2Detector.__call__
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64                           # every DINOv2 release: ViT-S 384/6, B 768/12, L 1024/16, g 1536/24
INTERPOLATE_OFFSET = 0.1                # dinov2 hub default (backbones.py), see `DinoV2.interpolate_pos_embed`
RESIZE_MODES = ("torch", "pil")


class DinoV2(torch.nn.Module):
    """timm's ViT (`self.vit`) run with DINOv2's position-embedding interpolation, plus the release's mask token.

    x: (B, 3, H, W) float, ImageNet-normalised, H and W multiples of the patch -> (B, embed_dim): the class
    token after the final LayerNorm (the official `forward` in eval mode; its head is an Identity).
    """

    def __init__(self,
                 embed_dim: int = 1024,   # ViT-L
                 depth: int = 24,
                 num_heads: int = 16,
                 mlp_ratio: float = 4.0,
                 patch_size: int = 14,
                 img_size: int = 518,     # training resolution: the position embeddings are a 37×37 grid
                 init_values: float = 1.0):  # LayerScale (its trained values come from the weights)
        super().__init__()
        # Imported here: timm takes seconds to import, and only FD_DINOv2 needs it.
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, init_values=init_values,
                                     num_classes=0, global_pool="token", class_token=True, dynamic_img_size=True,
                                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), weight_init="skip")
        # Only DINOv2's masked-image training uses it; it is in the release, so the strict load accounts for it.
        self.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim))
        self.embed_dim = embed_dim

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h·w, C) position embeddings for an h×w patch grid, as dinov2 `interpolate_pos_encoding`:
        bicubic without antialias, given the scale factor (h + 0.1) / M rather than the output size. PyTorch
        maps coordinates with that factor, so this differs from timm's `resample_abs_pos_embed` (size-based)."""
        pos = self.vit.pos_embed
        n = pos.shape[1] - 1
        if h * w == n and h == w:
            return pos
        m = math.isqrt(n)
        grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((h + INTERPOLATE_OFFSET) / m, (w + INTERPOLATE_OFFSET) / m)
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != (h, w):
            raise NeonError(f"DINOv2: position embeddings resized to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1].float(), grid], dim=1).to(pos.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit.patch_embed(x)                      # (B, h, w, C): timm's dynamic-size layout
        b, h, w, c = tokens.shape
        x = torch.cat([vit.cls_token.expand(b, -1, -1), tokens.reshape(b, h * w, c)], dim=1)
        x = vit.norm_pre(x + self.interpolate_pos_embed(h, w))
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)[:, 0]


def to_timm_keys(state: dict) -> dict:
    """Official DINOv2 keys -> DinoV2's: timm names every ViT tensor as DINOv2 does (blocks.i.ls1.gamma, ...),
    under `vit.`; the mask token stays outside."""
    return {(k if k == "mask_token" else f"vit.{k}"): v for k, v in state.items()}


def architecture(state_dict: dict, num_heads: int | None = None) -> dict:
    """DinoV2 constructor arguments read from an official state dict's shapes; num_heads is not in the file:
    default embed_dim / 64, the head width of every DINOv2 release."""
    embed_dim = int(state_dict["cls_token"].shape[-1])
    patch_size = int(state_dict["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state_dict["pos_embed"].shape[1]) - 1)
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads or max(embed_dim // HEAD_DIM, 1),
                mlp_ratio=hidden / embed_dim, patch_size=patch_size, img_size=grid * patch_size)


REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")


def load_dinov2(path: str | os.PathLike, num_heads: int | None = None) -> DinoV2:
    """The official `dinov2_vitl14_pretrain.pth` (or any DINOv2 ViT state dict in the official key layout, whose
    keys are timm's plus `mask_token`) as a DinoV2 in eval mode on the CPU; every key used, every shape checked
    (a mismatch is one line naming the file and the first differing keys)."""
    path = paths.input_file(os.fspath(path), "DINOv2 weights file")
    state = checkpoint.load_state_dict(path)
    absent = [k for k in REQUIRED if k not in state]
    if absent:
        raise NeonError(f"{path}: not a DINOv2 ViT state dict (no {absent[0]!r})")
    if state["pos_embed"].ndim != 3 or state["cls_token"].ndim != 3 or state["patch_embed.proj.weight"].ndim != 4:
        raise NeonError(f"{path}: not a DINOv2 ViT state dict (unexpected token or patch-embedding shapes)")
    n = int(state["pos_embed"].shape[1]) - 1
    if n < 1 or math.isqrt(n) ** 2 != n:
        raise NeonError(f"{path}: pos_embed holds {n} patch positions, not a square grid")
    kwargs = architecture(state, num_heads)
    if kwargs["embed_dim"] % kwargs["num_heads"]:
        raise NeonError(f"{path}: width {kwargs['embed_dim']} is not divisible by {kwargs['num_heads']} heads")
    what = f"{path} (DINOv2 weights)"
    with torch.device("meta"):  # the expected layout in the official names, so a mismatch names the file's keys
        expected = {k.removeprefix("vit."): v for k, v in DinoV2(**kwargs).state_dict().items()}
    checkpoint.check_state_dict(expected, state, what)
    net = checkpoint.load_strict(lambda: DinoV2(**kwargs), to_timm_keys(state), what)
    return net.eval().requires_grad_(False)


def resize_pil(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, 224, 224) with PIL's bicubic filter (dgm-eval's reference resize)."""
    out = [np.asarray(PIL.Image.fromarray(img).resize((RESOLUTION, RESOLUTION), PIL.Image.BICUBIC))  # (H, W, 3): RGB
           for img in x.permute(0, 2, 3, 1).cpu().numpy()]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device)


class DINOv2Detector(torch.nn.Module):
    """uint8 (B, 3, H, W) of any size -> float32 (B, D) DINOv2 features (D = 1024 for ViT-L/14)."""

    def __init__(self, net: DinoV2, resize_mode: str = "torch"):  # 'torch' is EDM2's default, 'pil' dgm-eval's
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise NeonError(f"DINOv2 resize mode {resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        self.net = net
        self.resize_mode = resize_mode
        self.dim = int(net.embed_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_mode == "pil":
            x = resize_pil(x).to(torch.float32)
        else:  # the float 0..255 values, resized without rounding or clamping (EDM2's fast path)
            x = torch.nn.functional.interpolate(x.to(torch.float32), size=(RESOLUTION, RESOLUTION), mode="bicubic",
                                                antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.net(x).float()
