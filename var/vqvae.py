"""VAR's multi-scale VQVAE: a VQGAN-style convolutional encoder/decoder around the residual quantizer.

Released as `vae_ch160v4096z32.pth` (ch=160, V=4096, z=32, ch_mult (1,1,2,2,4): 16x downsampling); the same
file serves the 256px and the 512px models. Images are float in [-1, 1]. Constructor arguments and state-dict
keys follow the official `VQVAE`, `Encoder` and `Decoder`; `ch_mult`, `num_res_blocks`, `using_sa` and
`using_mid_sa` (hard-coded there) are arguments here so that tiny models share the code path.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.quant import VectorQuantizer2


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, softmax(qᵀk / √C), with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)   # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # asymmetric pad: right and bottom only


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnet blocks, optional attention after each, then an optional resampler."""

    def __init__(self, channels: Sequence[int], attention: bool, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:])])
        self.attn = nn.ModuleList([AttnBlock(c) for c in channels[1:]] if attention else [])
        if resample == "down":
            self.downsample = Downsample2x(channels[-1])
        elif resample == "up":
            self.upsample = Upsample2x(channels[-1])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class Mid(nn.Module):
    def __init__(self, channels: int, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> features (B, z_channels, H/2^(n-1), W/2^(n-1)); attention only at the last level."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 32, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList([
            Level([widths[i]] + [widths[i + 1]] * num_res_blocks, attention=using_sa and i == n - 1,
                  resample="down" if i != n - 1 else None)
            for i in range(n)])
        self.mid = Mid(widths[-1], using_mid_sa)
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h·2^(n-1), w·2^(n-1)). `up[i]` is level i; the levels run
    from the last (lowest resolution, with attention) to the first, as in the official ordering of keys."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 32, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        n = len(ch_mult)
        c_last = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_last, 3, 1, 1)
        self.mid = Mid(c_last, using_mid_sa)
        # Input width of level i is the output width of level i+1 (the level run just before it).
        c_in = [ch * ch_mult[i + 1] if i + 1 < n else c_last for i in range(n)]
        self.up = nn.ModuleList([
            Level([c_in[i]] + [ch * ch_mult[i]] * (num_res_blocks + 1), attention=using_sa and i == n - 1,
                  resample="up" if i != 0 else None)
            for i in range(n)])
        self.norm_out = Normalize(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    def __init__(
        self,
        vocab_size: int = 4096,                # V: codebook entries
        z_channels: int = 32,                  # Cvae: latent / codebook channels
        ch: int = 128,                         # base width of the conv stacks (160 at release)
        dropout: float = 0.0,                  # kept for the official signature (0 at release)
        beta: float = 0.25,                    # commitment weight (VAE training only)
        using_znorm: bool = False,             # cosine nearest neighbour instead of L2
        quant_conv_ks: int = 3,                # kernel of quant_conv / post_quant_conv
        quant_resi: float = 0.5,               # φ mixing ratio r
        share_quant_resi: int = 4,             # number of partially shared φ layers
        default_qresi_counts: int = 0,         # number of φ when not shared (0 = one per scale)
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),   # pn_k of the K scales
        test_mode: bool = True,                # frozen (eval, no grad), as VAR always uses it
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),   # width multiplier per level (fixed at release; 16x down)
        num_res_blocks: int = 2,
        using_sa: bool = True,                 # attention at the lowest-resolution level
        using_mid_sa: bool = True,             # attention in the middle block
    ):
        super().__init__()
        self.V, self.Cvae = vocab_size, z_channels
        self.vocab_size = vocab_size
        self.downsample = 2 ** (len(ch_mult) - 1)
        conv = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, in_channels=3,
                    z_channels=z_channels, using_sa=using_sa, using_mid_sa=using_mid_sa)
        if dropout > 1e-6:
            raise ValueError("VQVAE dropout is only used when training the VAE, which this project does not do")
        self.encoder = Encoder(**conv)
        self.decoder = Decoder(**conv)
        self.quantize = VectorQuantizer2(vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
                                         default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
                                         quant_resi=quant_resi, share_quant_resi=share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, quant_conv_ks // 2)
        if test_mode:
            self.eval().requires_grad_(False)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.v_patch_nums

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def img_to_f(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> continuous latent f (B, Cvae, H/16, W/16) before quantization."""
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def img_to_idxBl(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> token indices per scale, [(B, pn_k²) int64 for k = 1..K]."""
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=False)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, P, P) -> image (B, 3, 16P, 16P) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def idxBl_to_img(self, idx_Bl: Sequence[torch.Tensor], last_one: bool = True):
        """Token indices per scale -> the reconstruction in [-1, 1] (last_one) or one image per scale."""
        f_hats = self.quantize.idx_to_fhat(idx_Bl)
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f) for f in f_hats]

    @torch.no_grad()
    def img_to_reconstructed_img(self, x: torch.Tensor, last_one: bool = True):
        f_hats = self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=True)
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # As the official loader: the usage statistics hold one row per scale of the model the VAE was trained
        # with; a model built for another number of scales keeps its own (they never affect any output).
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict = dict(state_dict)
            state_dict[key] = torch.zeros(self.quantize.ema_vocab_hit_SV.shape, dtype=state_dict[key].dtype,
                                          device=state_dict[key].device)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
