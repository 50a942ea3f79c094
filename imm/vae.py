"""Pixels <-> IMM latents through Stable Diffusion's VAE (`stabilityai/sd-vae-ft-ema`, 8x downsampling).

IMM does not use the SD `scaling_factor`; it whitens each latent channel with fixed statistics of ImageNet
latents (lumalabs/imm training/encoders.py `StabilityVAEEncoder`, release arguments in
configs/im256_generate_images.yaml):

    final = raw * scale + bias,   scale = 0.5 / raw_std,   bias = -raw_mean * scale   (numpy float32)

Encoding keeps the posterior's [mean, std] (the "raw latents" of the official datasets); a training step draws
raw = mean + std * N(0, I) from them, as the official encoder does every time it encodes an image. The official
code runs the VAE in float16; we do so on CUDA and keep float32 on the CPU.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from neon.errors import NeonError
from neon.startup import import_attribute  # diffusers, imported where used: seconds of start-up otherwise

VAE_NAME = "stabilityai/sd-vae-ft-ema"
RAW_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)       # per-channel mean of raw ImageNet-256 latents
RAW_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)      # per-channel std
FINAL_MEAN, FINAL_STD = 0.0, 0.5                               # statistics of the latents the network sees


class LatentVAE(nn.Module):
    """An `AutoencoderKL` plus IMM's per-channel latent mapping. Images are uint8 (B, H, W, 3); final latents are
    float (B, 4, H/8, W/8) with std about 0.5."""

    def __init__(self, vae: nn.Module, raw_mean=RAW_MEAN, raw_std=RAW_STD, final_mean: float = FINAL_MEAN,
                 final_std: float = FINAL_STD, batch_size: int = 8):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
        bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
        self.register_buffer("scale", torch.from_numpy(scale).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("bias", torch.from_numpy(bias).reshape(1, -1, 1, 1), persistent=False)
        # images per VAE call, as the official encoder (memory; the last bits may follow it)
        self.batch_size = batch_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> posterior [mean, std] (B, 2 * 4, H/8, W/8) float32 (the official raw latents)."""
        device = self.scale.device
        x = images.to(device).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
        out = []
        for chunk in x.split(self.batch_size):
            dist = self.vae.encode(chunk.to(self._vae_dtype())).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).to(torch.float32))
        return torch.cat(out)

    def moments_to_latents(self, moments: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[mean, std] (B, 8, h, w) -> final latents (B, 4, h, w): a posterior draw, whitened. noise defaults to
        torch.randn from the global RNG (one draw per call, as the official encoder)."""
        mean, std = moments.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn_like(mean) if noise is None else noise
        return (mean + noise * std) * self.scale + self.bias

    def latents_to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> the SD-VAE's own latent space (what its decoder takes), float32."""
        return (latents.to(torch.float32) - self.bias) / self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents (B, 4, h, w) -> uint8 (B, 8h, 8w, 3) on the CPU. Pixels are truncated to uint8, as in
        the official decoder ((x / 2 + 0.5).clamp(0, 1) * 255, then .to(uint8))."""
        raw = self.latents_to_raw(latents.to(self.scale.device))
        out = [self.vae.decode(chunk.to(self._vae_dtype())).sample.to(torch.float32)
               for chunk in raw.split(self.batch_size)]
        x = torch.cat(out)
        x = (x * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu()


def load_vae(path: str | None = None, device: torch.device | str = "cpu", fp16: bool = True,
             **mapping) -> LatentVAE:
    """The SD-VAE from a local diffusers folder, or from the Hugging Face hub when `path` is a hub id (default
    'stabilityai/sd-vae-ft-ema'; downloads). fp16: run it in float16 on CUDA, as the official code does."""
    AutoencoderKL = import_attribute("diffusers", "AutoencoderKL")

    path = path or VAE_NAME
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise NeonError(f"VAE {path!r}: not a diffusers folder (no config.json)")
    if not os.path.exists(path) and (path.startswith((".", "/")) or path.count("/") != 1):
        raise NeonError(f"VAE {path!r}: no such folder (and not a hub id like {VAE_NAME!r})")
    device = torch.device(device)
    dtype = torch.float16 if fp16 and device.type == "cuda" else torch.float32
    try:
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise NeonError(f"VAE {path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    return LatentVAE(vae, **mapping).to(device)


def tiny_vae(seed: int = 0, device: torch.device | str = "cpu") -> LatentVAE:
    """A randomly initialised AutoencoderKL with the SD-VAE layout (4 levels, 8x downsampling, 4 latent
    channels) at a few thousand parameters, with the release latent mapping."""
    AutoencoderKL = import_attribute("diffusers", "AutoencoderKL")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                            sample_size=32)
    return LatentVAE(vae).to(device)
