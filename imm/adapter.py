"""The IMM family for the Neon core: ImageNet-256 Inductive Moment Matching (DiT-XL/2 flow map + SD-VAE).

- load:   an IMM pickle (`imagenet256_ts_a2.pkl`, `Neon_imm_imagenet256.pkl`, or a copy written by `save`) or our
          own container -> the `ema` IMMPrecond (the network Neon fine-tunes and merges) + the SD-VAE helper.
- sample: pushforward sampler, `steps` flow-map jumps with guidance `cfg` (release preset: 8 steps, cfg 1.5).
- encode: images -> SD-VAE posterior [mean, std]; each loss call draws a latent from it (the official training
          re-encodes its PNG set every step, which draws a fresh posterior sample the same way).
- loss:   IMM's moment-matching loss with the Neon fine-tuning settings; the stop-gradient target is
          `bundle.net` itself under no_grad at the nearer time r (as in the official training, not the EMA).
- save:   into a copy of the file the network came from (official container), else our own container.

Self-training recipe (SinaAlemohammad/Neon imm/configs/im256.yaml, imm/training/training_loop.py): AdamW
lr 1e-6, betas (0.9, 0.999), eps 1e-8, weight decay 0; no gradient clipping; the trained branch under fp16
autocast with a GradScaler (network mixed_precision 'fp16'), the target branch in float32 (force_fp32).
"""
from __future__ import annotations

from typing import Sequence

import torch

from imm.checkpoint import build_network, load_network, save_network
from imm.loss import IMMLoss
from imm.sampler import check_labels, one_hot, sample_latents
from imm.vae import load_vae, tiny_vae
from neon import fastpaths
from neon.errors import NeonError
from neon.family import Bundle, TrainDefaults

# The Neon fine-tuning loss settings (imm/configs/im256.yaml `loss:`); configs override them via loss_args.
LOSS_DEFAULTS = dict(sigma=1.0, sample_t_mode="uniform", matrix_size=4, sample_repeat=1, a=2, b=4, k=12,
                     label_dropout=0.1, min_tr_gap=1e-4)

# A DiT of ~60k parameters on 4x4x4 latents (32x32 images through the tiny VAE), same code paths as DiT-XL/2.
TINY_CONFIG = dict(img_resolution=4, img_channels=4, label_dim=10, model_type="DiT", patch_size=2, hidden_size=32,
                   depth=2, num_heads=2, mlp_ratio=4.0, num_classes=10, s_embed=True, noise_schedule="fm",
                   f_type="euler_fm", temb_type="stride", time_scale=1000, sigma_data=0.5, eps=0.0, T=0.994)


def _randomize(net: torch.nn.Module, seed: int) -> None:
    """Give every learnable weight a random value (DiT's own init zeroes the output layers, which would make the
    tiny network the identity map): matrices N(0, 1/fan_in), label table N(0, 0.5^2), vectors N(0, 0.05^2).
    The frozen sin-cos pos_embed keeps its table."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("pos_embed"):
                continue
            if name.endswith("embedding_table.weight"):
                std = 0.5
            elif p.ndim >= 2:
                std = p[0].numel() ** -0.5
            else:
                std = 0.05
            p.copy_(torch.randn(p.shape, generator=gen) * std)


class IMMFamily:
    name = "imm"
    train_defaults = TrainDefaults(optimizer="adamw", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   grad_clip=None, autocast="fp16")

    # -- networks ------------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", vae_path: str | None = None,
             temb_type: str | None = None, vae_fp16: bool = True) -> Bundle:
        """path: IMM checkpoint; vae_path: local diffusers folder of sd-vae-ft-ema (default: the hub id), or
        'tiny' for the tiny VAE (smoke runs reloading a tiny network); temb_type: override the recorded
        second-time input ('identity' for imagenet256_s_a1.pkl)."""
        net = load_network(path, device, temb_type)
        vae = tiny_vae(device=device) if vae_path == "tiny" else load_vae(vae_path, device, fp16=vae_fp16)
        return self._bundle(net, vae, source=str(path))

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, vae_path: str | None = None,
             temb_type: str | None = None, vae_fp16: bool = True) -> Bundle:
        """A ~60k-parameter IMMPrecond randomly initialised from `seed` and the ~70k-parameter tiny
        AutoencoderKL (always the same one, so `load(..., vae_path='tiny')` decodes a saved tiny network alike).
        vae_path and vae_fp16 are accepted for config compatibility and ignored."""
        net = build_network(TINY_CONFIG, "cpu", temb_type)
        _randomize(net, seed)
        return self._bundle(net.to(device).eval().requires_grad_(False), tiny_vae(device=device), source=None)

    @staticmethod
    def _bundle(net, vae, source: str | None) -> Bundle:
        if vae.latent_channels != net.img_channels:
            raise NeonError(f"VAE has {vae.latent_channels} latent channels, the IMM network {net.img_channels}")
        return Bundle(net=net, helpers={"vae": vae}, num_classes=net.label_dim,
                      resolution=net.img_resolution * vae.downsample, source=source,
                      info={"init_kwargs": dict(net.init_kwargs)})

    # -- the protocol --------------------------------------------------------------------------------------
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None, steps: int = 8,
               cfg: float | None = 1.5, autocast: str | None = None, batch_invariant: bool = False,
               compile: bool | str = False) -> torch.Tensor:
        """seeds (B,) + labels int64 (B,) -> uint8 (B, H, W, 3) on the CPU. steps: flow-map jumps (1, 2, 4, 8);
        cfg: guidance scale (None = no guidance); autocast: None (float32 DiT) or 'bf16' / 'fp16' on CUDA;
        compile: the DiT's forward through torch.compile (neon.fastpaths; images agree with eager to rounding).

        The batch runs through the DiT and the VAE decoder at once, as the official sampler. batch_invariant:
        compute the images one at a time instead (BLAS, oneDNN and CUDA pick kernels, and so their rounding, by
        batch size), so that an image does not depend on the batch it was drawn in.
        """
        if batch_invariant and len(seeds) > 1:
            labels = None if labels is None else torch.as_tensor(labels)
            return torch.cat([self.sample(bundle, [s], None if labels is None else labels[i:i + 1], steps, cfg,
                                          autocast, compile=compile) for i, s in enumerate(seeds)])
        net = _precond(bundle.net)
        with fastpaths.compiled(net.model, compile):
            latents = sample_latents(net, seeds, labels, steps=steps, cfg=cfg, autocast=autocast)
        return bundle.helpers["vae"].decode(latents)

    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, 3) + labels -> {'moments': float32 (B, 8, H/8, W/8) posterior [mean, std],
        'labels': int64 (B,)} on the CPU."""
        res = bundle.resolution
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (res, res, 3):
            raise NeonError(f"IMM encode expects uint8 images (B, {res}, {res}, 3), got {images.dtype} "
                            f"{tuple(images.shape)}")
        labels = check_labels(labels, images.shape[0], bundle.num_classes)
        moments = bundle.helpers["vae"].encode_moments(images)
        return {"moments": moments.cpu(), "labels": labels.to(torch.int64).cpu()}

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean IMM loss over the batch's groups of `matrix_size` (the per-rank batch must be a multiple of it).
        Draws, in order, from the global RNG: the posterior latents, then the loss's times, label dropout and
        noise (the official order)."""
        args = {**LOSS_DEFAULTS, **bundle.info.get("loss_args", {})}
        try:
            loss_fn = IMMLoss(**args)
        except TypeError as e:
            raise NeonError(f"IMM loss_args not understood: {e}") from None
        net = _precond(bundle.net)
        device = next(net.parameters()).device
        y = bundle.helpers["vae"].moments_to_latents(batch["moments"].to(device))
        labels = one_hot(batch["labels"].to(device), net.label_dim)
        return loss_fn(bundle.net, y, labels).mean()

    def save(self, bundle: Bundle, path: str) -> None:
        save_network(_precond(bundle.net), path, template=bundle.source)


def _precond(net: torch.nn.Module) -> torch.nn.Module:
    """The IMMPrecond inside a DDP wrapper, or the network itself."""
    return getattr(net, "module", net)
