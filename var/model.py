"""The VAR transformer (Tian et al. 2024): next-scale prediction over the VQVAE's token pyramid.

The K token maps of sizes pn_1² .. pn_K² form one sequence of L = Σ pn_k² tokens. Scale k is predicted all at
once from the class and all coarser scales: a block-causal mask in training (a token sees its own and every
earlier scale), a key/value cache when sampling. Every block is conditioned on the class embedding by adaptive
LayerNorm (six vectors per block: two gates γ, two scales, two shifts), either from a per-block linear layer or,
in the "shared AdaLN" variant of VAR-d36-s, from one shared linear layer plus a learned per-block offset.

Constructor arguments and state-dict keys follow the official `VAR` / `AdaLNSelfAttn` / `SelfAttention`, so the
released `var_d16.pth` .. `var_d36.pth` load with `strict=True`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.invariant import Linear, linear

# exp(scale_mul) is capped at 100: the official code clamps at log(100) computed in float32 this way.
MAX_SCALE_MUL = float(torch.log(torch.tensor(100)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p (rescaling the kept ones)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per block: (B, heads, L, head_dim)."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            shape = k.shape[:2] + (capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention; with attn_l2_norm, q and k are L2-normalised per head and q is scaled by a
    learned per-head factor exp(min(s, log 100)) (softmax scale 1), which keeps large VARs stable."""

    def __init__(self, embed_dim: int = 768, num_heads: int = 12, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_l2_norm: bool = False):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))   # keys have no bias
        self.proj = Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None,
                capacity: int = 0) -> torch.Tensor:
        """x: (B, l, C); mask: bool (l, l) True = may attend (teacher forcing) or None; with `cache`, keys and
        values are appended to it (capacity = total tokens) and the queries attend to everything cached."""
        B, l, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear(x, self.mat_qkv.weight, bias).view(B, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # (B, H, l, head_dim) each
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v, capacity)
        dropout_p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, l, C)))


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    """x = x + γ1·attn(LN(x)(1+scale1)+shift1);  x = x + γ2·ffn(LN(x)(1+scale2)+shift2)."""

    def __init__(self, embed_dim: int, cond_dim: int, shared_aln: bool, num_heads: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 attn_l2_norm: bool = False):
        super().__init__()
        self.C, self.D, self.shared_aln = embed_dim, cond_dim, shared_aln
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, capacity: int = 0) -> torch.Tensor:
        """x: (B, l, C); cond: (B, D) class embedding, or (B, 1, 6, C) shared AdaLN output when shared_aln."""
        if self.shared_aln:
            ada = self.ada_gss + cond
        else:
            ada = self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)      # (B, 1, C) each
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), mask, cache, capacity)
        x = x + self.drop_path(h.mul_(gamma1))
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2))
        return x + self.drop_path(h.mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class SharedAdaLin(Linear):
    """One linear layer that gives every block its six AdaLN vectors (VAR-d36-s): (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def level_index(patch_nums: Sequence[int]) -> torch.Tensor:
    """(1, L) int64: the scale k of every token of the sequence."""
    return torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(patch_nums)]).view(1, -1)


class VAR(nn.Module):
    def __init__(
        self,
        vae_local=None,                        # the VQVAE (only its vocab_size and Cvae are read)
        num_classes: int = 1000,               # real classes; label num_classes is the null (unconditional) class
        depth: int = 16,                       # number of blocks
        embed_dim: int = 1024,                 # C = 64·depth at release
        num_heads: int = 16,                   # = depth at release (head_dim 64)
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,           # stochastic depth, linear over blocks (0.1·depth/24 at release)
        norm_eps: float = 1e-6,
        shared_aln: bool = False,              # one shared AdaLN linear layer + per-block offsets (d36-s)
        cond_drop_rate: float = 0.1,           # label dropout for classifier-free guidance (applied by the loss)
        attn_l2_norm: bool = False,            # L2-normalised q/k with learned scale (True at release)
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),   # pn_k of the K scales
        vocab_size: int | None = None,         # V, when no vae_local is given
        Cvae: int | None = None,               # VQ latent channels, when no vae_local is given
    ):
        super().__init__()
        self.V = vae_local.vocab_size if vae_local is not None else vocab_size
        self.Cvae = vae_local.Cvae if vae_local is not None else Cvae
        if self.V is None or self.Cvae is None:
            raise ValueError("VAR needs vae_local or both vocab_size and Cvae")
        self.num_classes, self.depth, self.num_heads = num_classes, depth, num_heads
        self.C = self.D = embed_dim                              # width; the condition has the same size
        self.cond_drop_rate, self.drop_path_rate = cond_drop_rate, drop_path_rate
        self.patch_nums = tuple(int(pn) for pn in patch_nums)
        if len(self.patch_nums) < 2:
            raise ValueError(f"VAR needs at least two scales, got patch_nums={self.patch_nums}")
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        # Registration order fixes the state-dict order; it is the official one.
        std = math.sqrt(1 / self.C / 3)
        self.pos_start = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.first_l, self.C), std=std))
        self.pos_1LC = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.L, self.C), std=std))
        lvl_1L = level_index(self.patch_nums)
        self.register_buffer("lvl_1L", lvl_1L)
        # Stored because the official state dict holds it (0 where key scale <= query scale, else -inf). The
        # forward pass derives its mask from lvl_1L instead, so a merge that turns the -inf into NaN is harmless.
        same_or_coarser = lvl_1L.view(-1, 1) >= lvl_1L.view(1, -1)
        self.register_buffer("attn_bias_for_masking",
                             torch.where(same_or_coarser, 0.0, -torch.inf).view(1, 1, self.L, self.L))

        self.word_embed = Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight, std=std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=std)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if shared_aln
                               else nn.Identity())
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()   # cpu: also when built on meta
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(self.C, self.D, shared_aln, num_heads, mlp_ratio=mlp_ratio, drop=drop_rate,
                          attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps, attn_l2_norm=attn_l2_norm)
            for i in range(depth)])
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = Linear(self.C, self.V)

    # ----------------------------------------------------------------------------------------------------
    def block_causal_mask(self, end: int) -> torch.Tensor:
        """bool (end, end): token i may attend to token j iff scale(j) <= scale(i)."""
        lvl = self.lvl_1L[0, :end]
        return lvl.view(-1, 1) >= lvl.view(1, -1)

    def class_cond(self, label_B: torch.Tensor) -> torch.Tensor:
        """Labels (B,) int64 in [0, num_classes] (num_classes = null class) -> conditioning vector (B, C)."""
        return self.class_emb(label_B)

    def lvl_pos(self, begin: int, end: int) -> torch.Tensor:
        """Level + position embedding of tokens begin..end-1: (1, end-begin, C)."""
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def first_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale 1: class embedding + start position + level/position embedding, (B, first_l, C)."""
        sos = cond.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start.expand(cond.shape[0], -1, -1)
        return sos + self.lvl_pos(0, self.first_l)

    def next_tokens(self, x_BlCv: torch.Tensor, si: int) -> torch.Tensor:
        """Input tokens of scale si (>= 1) from the area-downsampled f_hat (B, pn_si², Cvae) -> (B, pn_si², C)."""
        begin, end = self.begin_ends[si]
        return self.word_embed(x_BlCv.float()) + self.lvl_pos(begin, end)

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond).float()).float()

    def backbone(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                 caches: list[KVCache] | None = None, residual_dtype: torch.dtype | None = None,
                 last: int | None = None) -> torch.Tensor:
        """Token inputs (B, l, C) -> logits (B, l, V) through all blocks and the head (only for the `last` tokens
        when given). `residual_dtype` casts the residual stream and the AdaLN input (the official training
        forward runs them in the autocast dtype)."""
        cond_or_gss = self.shared_ada_lin(cond)
        if residual_dtype is not None:
            x, cond_or_gss = x.to(residual_dtype), cond_or_gss.to(residual_dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cond_or_gss, mask, None if caches is None else caches[i], self.L)
        return self.logits(x if last is None else x[:, -last:], cond)

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: labels (B,) and the VQVAE's next-scale inputs (B, L - first_l, Cvae) -> logits
        (B, L, V) for every token of every scale. Label dropout is the loss's business (see var.loss)."""
        with torch.autocast(x_BLCv_wo_first_l.device.type, enabled=False):   # embeddings in float32, as official
            cond = self.class_cond(label_B)
            sos = cond.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start
            x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x = x + self.lvl_pos(0, self.L)
        device_type = x.device.type
        amp_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return self.backbone(x, cond, mask=self.block_causal_mask(self.L), residual_dtype=amp_dtype)

    # ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1.0, generator: torch.Generator | None = None) -> None:
        """The official initialisation recipe (used for freshly built tiny models; released weights overwrite
        it): truncated normals, a small head, AdaLN gates near zero so every block starts close to identity."""
        std = init_std if init_std >= 0 else math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
                block.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()
