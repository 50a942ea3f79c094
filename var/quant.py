"""The multi-scale residual quantizer of VAR's VQVAE (Tian et al. 2024, Sec. 3.2 and Algorithm 1).

A latent f (B, Cvae, P, P) is written as a sum over K scales: at scale k the residual is area-downsampled to
pn_k × pn_k, each position snaps to its nearest codebook entry, and the looked-up map is upsampled (bicubic)
back to P × P and refined by a small convolution φ_k before it is added to f_hat and taken off the residual.
The same steps, run from token indices instead of a latent, give VAR its teacher-forcing input and, during
sampling, the input of the next scale.

State-dict keys follow the official `VectorQuantizer2`: `embedding.weight`, `ema_vocab_hit_SV` and
`quant_resi.*` (`qresi_ls.j` for the partially shared φ of the releases).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from var import invariant


class Phi(nn.Conv2d):
    """φ(h) = (1 - r)·h + r·conv3x3(h): the residual refinement applied to every upsampled code map."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def _ticks(K: int) -> np.ndarray:
    """Positions in [0, 1] that K shared φ layers stand for (official values; 4 layers use 1/12 .. 11/12)."""
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_index(si: int, num_scales: int, K: int) -> int:
    """Which of K φ layers scale `si` uses: the tick nearest to si/(S-1), ties to the first, in float64 as the
    official lookup (for 10 scales and K=4 this is [0, 0, 1, 1, 1, 2, 2, 3, 3, 3])."""
    return int(np.argmin(np.abs(_ticks(K) - si / (num_scales - 1))))


class PhiPartiallyShared(nn.Module):
    """K φ layers shared across all scales by position (the release setting, K = share_quant_resi = 4)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]


class PhiShared(nn.Module):
    """One φ for every scale (share_quant_resi = 1)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    """One φ per scale (share_quant_resi = 0); keys are `quant_resi.<j>.*` as in the official ModuleList."""

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]


def area_down(f: torch.Tensor, pn: int) -> torch.Tensor:
    """(B, C, P, P) -> (B, C, pn, pn) by area averaging (overlapping windows when P is not a multiple of pn)."""
    return F.interpolate(f, size=(pn, pn), mode="area")


def bicubic_up(h: torch.Tensor, P: int) -> torch.Tensor:
    """(B, C, pn, pn) -> (B, C, P, P), PyTorch bicubic (a = -0.75, align_corners=False)."""
    return F.interpolate(h, size=(P, P), mode="bicubic")


class VectorQuantizer2(nn.Module):
    def __init__(
        self,
        vocab_size: int,                       # V: codebook entries (4096 at release)
        Cvae: int,                             # latent channels (32 at release)
        using_znorm: bool = False,             # nearest neighbour by cosine instead of L2 (off at release)
        beta: float = 0.25,                    # commitment weight (VAE training only; kept for the constructor)
        default_qresi_counts: int = 0,         # number of φ when not shared; 0 = one per scale
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),   # pn_k: side of scale k's token map
        quant_resi: float = 0.5,               # r in φ(h) = (1-r)h + r·conv(h); 0 = no φ
        share_quant_resi: int = 4,             # 0: one φ per scale, 1: one φ in all, K>1: K φ shared by position
    ):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm, self.beta = vocab_size, Cvae, using_znorm, beta
        self.v_patch_nums = tuple(int(pn) for pn in v_patch_nums)
        self.quant_resi_ratio = quant_resi

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))

        # Codebook usage statistics of VAE training; kept only because the released state dict holds it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    @property
    def num_scales(self) -> int:
        return len(self.v_patch_nums)

    def phi(self, si: int) -> nn.Module:
        return self.quant_resi.select(si, self.num_scales)

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry at every position of z (B, Cvae, h, w) -> (B·h·w,) int64, row-major,
        first index on ties."""
        E = self.embedding.weight.detach()
        z_BNC = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, self.Cvae)
        if self.using_znorm:
            return torch.argmax(F.normalize(z_BNC, dim=-1) @ F.normalize(E.T, dim=0), dim=-1).reshape(-1)
        # ||z||² + ||e||² - 2 z·e, evaluated as the official code does so ties and near-ties break alike.
        d = z_BNC.square().sum(dim=-1, keepdim=True) + E.square().sum(dim=1)
        if invariant.enabled():   # one product per image (see var.invariant)
            d = torch.baddbmm(d, z_BNC, E.T.expand(z.shape[0], -1, -1), alpha=-2, beta=1)
        else:
            d = d.reshape(-1, E.shape[0]).addmm_(z_BNC.reshape(-1, self.Cvae), E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=-1).reshape(-1)

    def _scale_contribution(self, si: int, h: torch.Tensor, P: int) -> torch.Tensor:
        """Code map of scale si (B, Cvae, pn, pn) -> its φ-refined contribution to f_hat (B, Cvae, P, P)."""
        if si != self.num_scales - 1:
            h = bicubic_up(h, P)
        return self.phi(si)(h)

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Token indices (B, pn²), row-major over (h, w) -> code map (B, Cvae, pn, pn)."""
        B = idx_Bl.shape[0]
        # contiguous: PyTorch's channels-last kernels give batch-size-dependent last bits (see var.invariant)
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn).contiguous()

    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        """Quantize a latent f (B, Cvae, P, P), P = pn_last, scale by scale.

        Returns per scale either the token indices (B, pn²) int64 or, with to_fhat, the cumulative f_hat
        (B, Cvae, P, P) after that scale.
        """
        B, C, H, W = f.shape
        P = self.v_patch_nums[-1]
        if H != P or W != P:
            raise ValueError(f"latent is {H}x{W} but the last scale is {P}x{P}")
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si, pn in enumerate(self.v_patch_nums):
            idx = self._nearest(area_down(f_rest, pn) if si != self.num_scales - 1 else f_rest)
            h = self._scale_contribution(si, self.embed(idx.view(B, pn * pn), pn), P)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx.reshape(B, pn * pn))
        return out

    def idx_to_fhat(self, idx_Bl: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale token indices -> the cumulative f_hat (B, Cvae, P, P) after each scale."""
        P = self.v_patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(idx_Bl[0].shape[0], self.Cvae, P, P, dtype=torch.float32)
        out = []
        for si, pn in enumerate(self.v_patch_nums):
            f_hat = f_hat + self._scale_contribution(si, self.embed(idx_Bl[si], pn), P)
            out.append(f_hat)
        return out

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR: for k = 1..K-1, area_down(f_hat after scale k-1, pn_k), flattened
        row-major and concatenated -> (B, L - pn_0², Cvae) float32."""
        P = self.v_patch_nums[-1]
        B = idx_Bl[0].shape[0]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, P, P, dtype=torch.float32)
        next_scales = []
        for si in range(self.num_scales - 1):
            f_hat.add_(self.phi(si)(bicubic_up(self.embed(idx_Bl[si], self.v_patch_nums[si]), P)))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(area_down(f_hat, pn_next).reshape(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step: add scale si's code map h (B, Cvae, pn, pn) to f_hat (in place) and return
        (f_hat, the next scale's input map (B, Cvae, pn_next, pn_next), or None after the last scale)."""
        f_hat.add_(self._scale_contribution(si, h, self.v_patch_nums[-1]))
        if si == self.num_scales - 1:
            return f_hat, None
        pn_next = self.v_patch_nums[si + 1]
        return f_hat, area_down(f_hat, pn_next)
