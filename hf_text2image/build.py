"""A Stable Diffusion pipeline built from scratch at a chosen size, to train on a small data set (the Fashion-MNIST
text-to-image study): UNet2DConditionModel + a frozen random CLIPTextModel (its tokenizer files written locally)
+ AutoencoderKL + DDIMScheduler, with diffusers' own initialisation.

The text encoder stays random and frozen, as SD's CLIP stays frozen: distinct prompts give distinct token
embeddings, which is all the UNet's cross-attention needs to tell them apart. The VAE is random too: whoever trains
the UNet first trains the VAE on the images (a random decoder is no image model), as SD's was trained before it.
"""
from __future__ import annotations

import diffusers
import torch

from hf_text2image.tiny import SD_SCHEDULER, clip_tokenizer, text_encoder
from neon.errors import NeonError
from neon.family import Arg

BUILD_ARGS = (   # a StableDiffusionPipeline from scratch (`Text2ImageFamily.build`)
    Arg("model_channels", int, 32, "UNet: channels of the first level; level i has model_channels x channel_mult[i]"),
    Arg("channel_mult", list[int], [1, 2], "UNet: channel multiplier of each resolution level"),
    Arg("num_blocks", int, 1, "UNet: residual blocks per level (layers_per_block)"),
    Arg("cross_attention_levels", list[int], [1], "UNet: the levels (0 = the finest) whose blocks cross-attend to "
        "the prompt; the middle block always does"),
    Arg("vae_channels", list[int], [16, 32], "VAE: channels of each level; latents are 2^(levels-1) times narrower"),
    Arg("latent_channels", int, 4, "VAE: channels of the latents"),
)


def build_parts(resolution: int, img_channels: int, words: list[str], seed: int, model_channels: int,
                channel_mult: list[int], num_blocks: int, cross_attention_levels: list[int], vae_channels: list[int],
                latent_channels: int) -> tuple[str, dict]:
    """(pipeline class, its components): images of `resolution`² × `img_channels` (1: grey), a tokenizer knowing
    `words`. The same seed gives the same weights."""
    levels = len(channel_mult)
    if not channel_mult or any(c <= 0 for c in channel_mult) or model_channels <= 0:
        raise NeonError(f"text2image build: channel_mult and model_channels must be positive, got {channel_mult}, "
                        f"{model_channels}")
    if not set(cross_attention_levels) <= set(range(levels)):
        raise NeonError(f"text2image build: cross_attention_levels must lie in [0, {levels}), got "
                        f"{cross_attention_levels}")
    factor = 2 ** (len(vae_channels) - 1)
    if resolution % (factor * 2 ** (levels - 1)):
        raise NeonError(f"text2image build: resolution {resolution} is not divisible by the VAE's {factor} times the "
                        f"UNet's {2 ** (levels - 1)}")
    down = tuple("CrossAttnDownBlock2D" if i in cross_attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple(b.replace("Down", "Up") for b in reversed(down))
    with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
        torch.manual_seed(seed)
        tokenizer = clip_tokenizer(words)
        encoder = text_encoder(tokenizer, False)
        vae = diffusers.AutoencoderKL(
            in_channels=img_channels, out_channels=img_channels, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels), block_out_channels=tuple(vae_channels),
            layers_per_block=1, norm_num_groups=min(8, min(vae_channels)), sample_size=resolution)
        unet = diffusers.UNet2DConditionModel(
            sample_size=resolution // factor, in_channels=latent_channels, out_channels=latent_channels,
            layers_per_block=num_blocks, block_out_channels=tuple(model_channels * m for m in channel_mult),
            down_block_types=down, up_block_types=up, cross_attention_dim=encoder.config.hidden_size,
            attention_head_dim=8, norm_num_groups=min(8, model_channels))
    parts = dict(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                 scheduler=diffusers.DDIMScheduler.from_config(SD_SCHEDULER))
    return "StableDiffusionPipeline", parts
