"""The pieces of the xAR transformer: RMSNorm, timestep embedding, 2-D axial RoPE, GeGLU MLP, attention with a
KV cache, and the adaLN block conditioned once per cell.

Names follow OliverRensu/xAR models/xar.py and models/rope.py (the parameter and buffer keys of the released
checkpoints); the code is our own.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / rms(x), computed in float32, optionally times a learned per-channel weight."""

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.weight is None else y * self.weight


class TimestepEmbedder(nn.Module):
    """Integer timestep t in [0, 1000] -> sinusoidal features [cos, sin] (256 wide) -> MLP -> (N, hidden)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.reshape(-1, 1).float() * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class AxialRoPE(nn.Module):
    """2-D rotary position embedding for one attention head (EVA-02 style, as xAR's VisionRotaryEmbeddingFast).

    The first half of head_dim rotates with the token's grid row, the second half with its column; each
    frequency f_j = 10000^(-2j / (head_dim/2)) turns an adjacent pair of channels. The (N, head_dim) cos/sin
    tables are stored in the model's token order (cell-major), so token n of a sequence uses row n.
    """

    def __init__(self, head_dim: int, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        self.register_buffer("freqs", freqs)
        angle_r = (rows.float()[:, None] * freqs).repeat_interleave(2, dim=-1)   # (N, half)
        angle_c = (cols.float()[:, None] * freqs).repeat_interleave(2, dim=-1)
        angles = torch.cat([angle_r, angle_c], dim=-1)                           # (N, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: (B, heads, N, head_dim), the tokens at positions [start, start + N) of the token order."""
        n = x.shape[-2]
        cos, sin = self.freqs_cos[start:start + n], self.freqs_sin[start:start + n]
        return x * cos + rotate_pairs(x) * sin


class GeGLU(nn.Module):
    """fc2(GELU(fc1_g(x)) * fc1_x(x)): timm's SwiGLU built with act_layer=GELU, as xAR uses it."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(F.gelu(self.fc1_g(x)) * self.fc1_x(x))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rows: torch.Tensor, cols: torch.Tensor,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = AxialRoPE(self.head_dim, rows, cols)

    def forward(self, x: torch.Tensor, start: int, mask: torch.Tensor | None, kv=None) -> torch.Tensor:
        """x: (B, N, dim), the tokens at positions [start, start + N) of the token order.

        mask: bool, broadcastable to (N, start + N), True where attention is allowed; None = attend to all.
        kv: this layer's cache (model.LayerKV) or None. With a cache, this call's keys and values are stored at
        [start, start + N) and the queries attend to positions [0, start + N), the earlier ones read from it.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q, start), self.rope(k, start)
        if kv is not None:
            k, v = kv.write(start, k, v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """x = x + gamma1 * Attn(modulate(RMSNorm(x), scale1, shift1)); x = x + gamma2 * MLP(modulate(...)).

    The adaLN parameters come from one condition vector per (sample, cell): class + timestep embedding.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rows: torch.Tensor, cols: torch.Tensor,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, rows, cols, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = GeGLU(dim, int(dim * mlp_ratio * 2 / 3.0), drop=proj_drop)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, start: int, mask: torch.Tensor | None,
                kv=None) -> torch.Tensor:
        """x: (B, C*T, dim) tokens of C whole cells of T tokens; cond: (B, C, dim), one row per cell."""
        B, N, D = x.shape
        cells = cond.shape[1]
        # One (gamma1, gamma2, scale1, scale2, shift1, shift2) per cell, broadcast over the cell's tokens.
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(B, cells, 1, 6, D).unbind(3)
        x = x.view(B, cells, N // cells, D)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + self.attn(h.view(B, N, D), start, mask, kv).view_as(x) * gamma1
        h = self.norm2(x) * (1 + scale2) + shift2
        x = x + self.mlp(h) * gamma2
        return x.view(B, N, D)
