"""Neon on low-rank adapters: the merge done in ΔW space, exactly.

A LoRA adapts a weight W by ΔW = s·B·A (A: (r, in), B: (out, r), s = alpha / r). Two cases:

    θr = θ0 (a fresh LoRA is self-trained on it):     θneon = θ0 − w·ΔW_s
    θr = θ0 + ΔW_r (a user's LoRA, training continued): θneon = θ0 + (1+w)·ΔW_r − w·ΔW_s

Both are one LoRA again, of rank r_r + r_s, by stacking the factors (rank concatenation):

    A = [A_r; A_s],   B = [(1+w)·s_r·B_r,  −w·s_s·B_s],   scale 1,

so B·A = (1+w)·ΔW_r − w·ΔW_s with no approximation. Blending the factors instead — (1+w)·A_r − w·A_s and the same
for B — is not the merge (B·A is bilinear), and negating both factors of ΔW_s gives (−wB)(−wA) = +w²·ΔW_s, the
self-trained direction itself. `truncate` brings a merged LoRA back to a smaller rank by SVD, reporting its error.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from neon.errors import NeonError
from neon.merge import check_w


@dataclasses.dataclass(frozen=True)
class Lora:
    """One adapted weight's factors: ΔW = scale · up @ down (down: (r, in), up: (out, r))."""
    down: torch.Tensor      # A
    up: torch.Tensor        # B
    scale: float = 1.0      # alpha / r

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW (out, in), in float32 (float64 kept)."""
        acc = torch.float64 if self.up.dtype == torch.float64 else torch.float32
        return self.scale * (self.up.to(acc) @ self.down.to(acc))


def _check_pair(name: str, r: Lora | None, s: Lora) -> None:
    if s.down.ndim != 2 or s.up.ndim != 2 or s.up.shape[1] != s.down.shape[0]:
        raise NeonError(f"LoRA {name}: factors of shapes {tuple(s.up.shape)} @ {tuple(s.down.shape)} do not multiply")
    if r is not None and (r.up.shape[0], r.down.shape[1]) != (s.up.shape[0], s.down.shape[1]):
        raise NeonError(f"LoRA {name}: θr's adapter is {tuple(r.up.shape[:1] + r.down.shape[1:])}, θs's "
                        f"{tuple(s.up.shape[:1] + s.down.shape[1:])}")


def neon_lora(theta_r: dict[str, Lora] | None, theta_s: dict[str, Lora], w: float) -> dict[str, Lora]:
    """The LoRA whose ΔW is (1+w)·ΔW_r − w·ΔW_s for every adapted weight (ΔW_r = 0 where θr has no adapter:
    theta_r None or without that name), by rank concatenation: exact, of rank r_r + r_s, scale 1.
    theta_s: the self-trained adapters (a fresh LoRA on θr, or θr's own LoRA trained on)."""
    w = check_w(w)
    extra = sorted(set(theta_r or {}) - set(theta_s))
    if extra:
        raise NeonError(f"LoRA: θr adapts {extra[0]!r}, which the self-trained adapter does not")
    merged = {}
    for name, s in theta_s.items():
        r = (theta_r or {}).get(name)
        _check_pair(name, r, s)
        downs, ups = [s.down], [-w * s.scale * s.up]
        if r is not None:
            downs.insert(0, r.down)
            ups.insert(0, (1 + w) * r.scale * r.up)
        merged[name] = Lora(torch.cat(downs, 0), torch.cat(ups, 1), 1.0)
    return merged


def truncate(lora: Lora, rank: int) -> tuple[Lora, float]:
    """The best rank-`rank` approximation of `lora`'s ΔW (SVD), and its relative error ‖ΔW − ΔW'‖ / ‖ΔW‖ in the
    Frobenius norm (0 when `rank` is at least the LoRA's own)."""
    if rank < 1:
        raise NeonError(f"LoRA rank: must be at least 1, got {rank}")
    if rank >= lora.rank:
        return lora, 0.0
    delta = lora.delta()
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    root = sv[:rank].sqrt()
    kept = Lora((root[:, None] * vh[:rank]).to(lora.down.dtype), (u[:, :rank] * root).to(lora.up.dtype), 1.0)
    norm = float(delta.norm())
    return kept, (float((delta - kept.delta()).norm()) / norm if norm else 0.0)


def merged_weight(weight: torch.Tensor, lora: Lora) -> torch.Tensor:
    """W + ΔW, computed in float32 (float64 kept) and cast back to W's dtype: the fused weight."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    out = weight.to(acc) + lora.delta().to(acc).reshape(weight.shape)
    if not math.isfinite(float(out.abs().max())):
        raise NeonError("LoRA: the merged weight is not finite")
    return out.to(weight.dtype)
