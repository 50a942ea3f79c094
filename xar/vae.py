"""The MAR KL-16 VAE (an LDM KL autoencoder) that maps 256x256 images to 16x16x16 latents for xAR.

Module and parameter names follow LTH14/mar models/vae.py, so `kl16.ckpt` (state dict under 'model') loads
strictly. Only encoding to the posterior moments and decoding are implemented: the losses and the
discriminator used to train the VAE are not needed here.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

LATENT_SCALE = 0.2325   # multiplies VAE latents so that they have unit std (MAR / xAR training and sampling)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    embed_dim: int = 16                          # latent channels
    ch: int = 128                                # base channel count (GroupNorm(32) needs multiples of 32)
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # channel multiplier per level; len-1 = number of 2x downsamplings
    num_res_blocks: int = 2                      # ResnetBlocks per encoder level (decoder: one more)
    encoder_attn_levels: tuple[int, ...] = (4,)  # encoder levels with self-attention (MAR: resolution 16 of 256)
    decoder_attn_levels: tuple[int, ...] = ()    # MAR's decoder has none
    use_variational: bool = True                 # quant_conv predicts (mean, logvar)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


KL16 = VAEConfig()   # the released kl16.ckpt


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:   # 1x1 projection of the skip path when the width changes
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # (b, hw, c)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]         # scale c^-1/2
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # asymmetric zero padding (right/bottom), as LDM


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> (B, 2*embed_dim, H/f, W/f) moments before quant_conv."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        widths = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in range(cfg.num_res_blocks)] if i in cfg.encoder_attn_levels else []
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = _middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, embed_dim, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, top, 3, padding=1)
        self.mid = _middle(top)
        # up[i] works at the resolution of encoder level i; it is built from the bottom (last level) up.
        levels = [None] * len(cfg.ch_mult)
        c_in = top
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out) for _ in range(cfg.num_res_blocks + 1)] if i in cfg.decoder_attn_levels else []
            levels[i] = _level(blocks, attns)
            if i != 0:
                levels[i].upsample = Upsample(c_out)
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = KL16):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, (2 if cfg.use_variational else 1) * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2*embed_dim, H/f, W/f) = [mean, logvar]."""
        moments = self.quant_conv(self.encoder(images))
        if not self.cfg.use_variational:
            moments = torch.cat([moments, torch.ones_like(moments)], dim=1)
        return moments

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def posterior(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonal Gaussian posterior: moments (B, 2C, h, w) -> mean, logvar (clamped to [-30, 20]), std."""
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    return mean, logvar, torch.exp(0.5 * logvar)


def posterior_sample(moments: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """mean + std * noise, noise ~ N(0, I) from the global RNG unless given."""
    mean, _, std = posterior(moments)
    if noise is None:
        noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Read the architecture off a state dict's keys and shapes (the file stores no config)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    enc_attn = tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
    dec_attn = tuple(i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in sd)
    embed_dim = sd["post_quant_conv.weight"].shape[0]
    return VAEConfig(embed_dim=embed_dim, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                     encoder_attn_levels=enc_attn, decoder_attn_levels=dec_attn,
                     use_variational=sd["quant_conv.weight"].shape[0] == 2 * embed_dim)
