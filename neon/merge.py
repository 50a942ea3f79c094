"""Merging: θneon = (1+w)·θr − w·θs.

A small w > 0 extrapolates away from the self-trained θs, undoing the degradation that training on
mode-seeking samples would cause (the paper's Eq. 3).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from neon.errors import NeonError


def check_w(w: float) -> float:
    w = float(w)
    if not math.isfinite(w):
        raise NeonError(f"merge weight w must be finite, got {w}")
    return w


def merge_tensor(theta_r: torch.Tensor, theta_s: torch.Tensor, w: float) -> torch.Tensor:
    """(1+w)·θr − w·θs for floating tensors, computed in float32 (float64 kept) and cast back to θr's dtype;
    integer and bool tensors (step counters, index buffers) are taken from θr unchanged."""
    if not theta_r.is_floating_point():
        return theta_r.clone()
    acc = torch.float64 if theta_r.dtype == torch.float64 else torch.float32
    merged = theta_r.to(acc) * (1.0 + w) - theta_s.to(acc) * w
    return merged.to(theta_r.dtype)


def check_compatible(theta_r: Mapping[str, torch.Tensor], theta_s: Mapping[str, torch.Tensor]) -> None:
    """Refuse (naming the first offending key) unless both hold the same keys with the same shapes."""
    for key in theta_r:
        if key not in theta_s:
            raise NeonError(f"checkpoints differ: key {key!r} is in the reference but not in the self-trained one")
    for key in theta_s:
        if key not in theta_r:
            raise NeonError(f"checkpoints differ: key {key!r} is in the self-trained but not in the reference one")
    for key, t in theta_r.items():
        if tuple(t.shape) != tuple(theta_s[key].shape):
            raise NeonError(f"checkpoints differ: {key!r} has shape {tuple(t.shape)} vs {tuple(theta_s[key].shape)}")


def merge_state_dicts(theta_r: Mapping[str, torch.Tensor], theta_s: Mapping[str, torch.Tensor],
                      w: float) -> dict[str, torch.Tensor]:
    """θneon = (1+w)·θr − w·θs, key by key (keys in θr's order)."""
    w = check_w(w)
    check_compatible(theta_r, theta_s)
    return {k: merge_tensor(t, theta_s[k], w) for k, t in theta_r.items()}
