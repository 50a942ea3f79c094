"""The DiT backbone of IMM: a Diffusion Transformer (Peebles & Xie) conditioned on two times and a class.

IMM's network F(x_t, t, s, y) sees the current time t and the target time s of the flow map: each has its own
sinusoidal embedder (`t_embedder`, `s_embedder`), and the conditioning vector is c = emb(t) + emb(s) + emb(y).
Every block is adaLN-Zero: c sets a shift, scale and gate around attention and around the MLP.

Module and parameter names are those of lumalabs/imm training/dit.py, so the released state dicts load strictly.
Attention, MLP and patch embedding compute what timm's modules (which the official code uses) compute, with the
same parameter names; they are written out here because importing timm (and torchvision with it) takes seconds,
which every `neon sample` process would pay.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from neon.errors import NeonError

# Named sizes (training/dit.py's DiT_XL_2 ... DiT_S_8 subclasses only fix these four arguments).
DIT_CONFIGS = {
    f"DiT_{size}_{patch}": dict(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads)
    for size, (hidden, depth, heads) in {"XL": (1152, 28, 16), "L": (1024, 24, 16),
                                         "B": (768, 12, 12), "S": (384, 12, 6)}.items()
    for patch in (2, 4, 8)
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D) * (1 + scale) + shift, with shift and scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t (N,) any real -> (N, dim) float64 [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).
    Computed in float64 because t is a time scaled by 1000 (a float32 product would lose the low bits)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """The fixed MAE 2-D sin-cos table, (grid_size^2, dim) float64 for row-major tokens. The first dim/2
    channels encode the column index, the last dim/2 the row index; each half is [sin, cos]."""
    if dim % 4:
        raise NeonError(f"DiT hidden_size must be a multiple of 4 for the 2-D sin-cos table, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


class TimestepEmbedder(nn.Module):
    """A scaled time (N,) -> (N, hidden_size): 256-d sinusoid, then Linear, SiLU, Linear."""

    def __init__(self,
                 hidden_size: int,
                 frequency_embedding_size: int = 256,   # width of the sinusoid
                 embedding_type: str = "positional",    # 'fourier' (random frequencies) is not used by the releases
                 use_mlp: bool = True,
                 scale: float = 1):                     # fourier frequencies only
        super().__init__()
        if embedding_type != "positional":
            raise NeonError(f"IMM time embedding {embedding_type!r} is not supported (only 'positional')")
        self.frequency_embedding_size = frequency_embedding_size
        self.use_mlp = use_mlp
        if use_mlp:
            self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(emb) if self.use_mlp else emb


class LabelEmbedder(nn.Module):
    """Class index (N,) in [0, num_rows) -> (N, hidden_size). IMM builds it with num_rows = num_classes + 1: the
    last row is the null class that guidance and label dropout use (selected by an all-zero one-hot)."""

    def __init__(self, num_rows: int, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        # A positive dropout_prob adds one more row that train-time token dropping selects (DiT's recipe).
        self.embedding_table = nn.Embedding(num_rows + int(dropout_prob > 0), hidden_size)
        self.num_rows = num_rows
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_rows, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention as timm's `Attention` (fused scaled-dot-product): x (N, T, D) -> (N, T, D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc2(dropout(act(fc1(x)))) then dropout, as timm's `Mlp`: (N, T, D) -> (N, T, D)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches to tokens, as timm's `PatchEmbed`: (N, C, H, W) -> (N, H/p * W/p, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise NeonError(f"DiT input is {tuple(x.shape[-2:])}, the network takes {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: x (N, T, D), c (N, temb) -> (N, T, D)."""

    def __init__(self, hidden_size: int, num_heads: int, temb_size: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=functools.partial(nn.GELU, approximate="tanh"), drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(temb_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then a linear map of each token to a patch: (N, T, D) -> (N, T, p*p*C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """F(x, 1000 t, 1000 (t - s) or 1000 s, y): latents (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self,
                 img_resolution: int,              # latent side H = W
                 patch_size: int = 2,
                 in_channels: int = 4,             # latent channels (input = output)
                 hidden_size: int = 1152,          # D
                 depth: int = 28,                  # number of DiT blocks
                 num_heads: int = 16,
                 mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.0,  # label dropout inside the DiT (0 in IMM: the loss drops labels)
                 num_classes: int = 1000,          # real classes; the label table has num_classes + 1 rows (null last)
                 s_embed: bool = True,             # second time embedder for the target time s
                 qk_norm: bool = False,
                 skip: bool = False,               # accepted and ignored, as the official DiT (never reaches a block)
                 embedding_kwargs: dict | None = None,   # TimestepEmbedder options
                 temb_mult: int = 1,
                 dropout: float = 0.0,             # MLP dropout
                 **unused):                        # img_channels, out_channels, label_dim from IMMPrecond, and any
        # other recorded argument: the official DiT ignores extra keyword arguments, and so does this one.
        super().__init__()
        if temb_mult != 1:  # the official FinalLayer takes a hidden_size-wide c: only temb_mult 1 runs
            raise NeonError(f"DiT temb_mult={temb_mult} is not supported (only 1)")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.s_embed = s_embed
        embedding_kwargs = dict(embedding_kwargs or {})
        if s_embed:
            self.s_embedder = TimestepEmbedder(hidden_size, **embedding_kwargs)
        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, **embedding_kwargs)
        self.y_embedder = LabelEmbedder(num_classes + 1, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos position table, stored in the checkpoint as a frozen parameter.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, hidden_size, mlp_ratio=mlp_ratio,
                                              qk_norm=qk_norm, dropout=dropout) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in [self.t_embedder] + ([self.s_embedder] if self.s_embed else []):
            if embedder.use_mlp:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def class_index(self, class_labels: torch.Tensor) -> torch.Tensor:
        """One-hot (N, num_classes) -> table row (N,): an all-zero row selects the null class (last row)."""
        is_uncond = 1 - class_labels.sum(dim=1, keepdim=True)
        return torch.cat([class_labels, is_uncond], dim=1).argmax(dim=1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) row-major tokens -> (N, C, H, W)."""
        n, tokens, _ = x.shape
        p, c = self.patch_size, self.out_channels
        h = w = int(tokens ** 0.5)
        x = x.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, h * p, w * p)

    def forward(self, x: torch.Tensor, noise_labels_t: torch.Tensor, noise_labels_s: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W); noise_labels_t, noise_labels_s (N,) or (1,) scaled times; class_labels (N, num_classes)
        one-hot (all-zero = null class). Returns F (N, C, H, W)."""
        y = self.class_index(class_labels)
        x = self.x_embedder(x) + self.pos_embed                       # (N, T, D)
        c = self.t_embedder(noise_labels_t.expand(x.shape[0]))        # a shared time is repeated to the batch
        if noise_labels_s is not None and self.s_embed:
            c = c + self.s_embedder(noise_labels_s.expand(x.shape[0]))
        c = c + self.y_embedder(y, self.training)                     # (N, D)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def build_dit(model_type: str, **kwargs) -> DiT:
    """'DiT' (every size given) or a named size ('DiT_XL_2', ...), as IMMPrecond's `model_type` selects."""
    if model_type == "DiT":
        return DiT(**kwargs)
    if model_type not in DIT_CONFIGS:
        raise NeonError(f"IMM model_type {model_type!r} is not supported (DiT, {', '.join(DIT_CONFIGS)}); "
                        f"the CIFAR-10 U-Nets are not implemented")
    fixed = DIT_CONFIGS[model_type]
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise NeonError(f"IMM model_type {model_type} fixes {', '.join(clash)}; do not pass them")
    return DiT(**fixed, **kwargs)
