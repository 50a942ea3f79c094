"""The xAR family for the Neon core: xAR-B / xAR-L / xAR-H on ImageNet-256 with the MAR KL-16 VAE.

- load:   release xAR-*.pth (plain state dict), Neon / training containers; `vae_path` = kl16.ckpt.
- sample: the official per-cell Euler–Maruyama sampler (CFG ramped over cells, KV cache), each image's noise
          from a generator seeded with its seed, decoded by the VAE to uint8 as Neon's generate_dataset.py.
- encode: VAE posterior moments of each image and of its mirror image (MAR's cached-latent format).
- loss:   xAR's flow-matching loss on posterior samples * 0.2325 of a random choice of the two moments
          (= official training on cached latents: random horizontal flip, fresh posterior noise each step).
- save:   a plain state dict (see xar/checkpoint.py for who reads it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence

import torch

from neon import containers, fastpaths
from neon.checkpoint import atomic_save
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults
from neon.fastpaths import Backends
from neon.guidance import GUIDE_SCALE, active_guide
from xar import checkpoint
from xar.loss import flow_matching_loss
from xar.model import XAR, XARConfig
from xar.sampler import MIN_STEPS, PerImageNoise, sample_tokens
from xar.vae import LATENT_SCALE, AutoencoderKL, VAEConfig, posterior_sample

# Tiny networks with the release code paths (the 16x16 latent grid in 4 cells of 8x8) for smoke runs and tests.
# The network only knows its token grid (img_size / vae_stride = 16, kept at the release values); the tiny
# VAE downsamples 2x, so its images are 32x32.
TINY_XAR = XARConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                     decoder_depth=1, decoder_num_heads=2, attn_dropout=0.1, proj_dropout=0.1)
TINY_VAE = VAEConfig(embed_dim=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(1,))

AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VAE_FILE = "kl16.ckpt"


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class XARFamily(Family):
    name = "xar"
    CONTAINERS = (containers.TORCH_ZIP, containers.LEGACY_TORCH)   # what `load` reads
    # SinaAlemohammad/Neon xAR generate_dataset.py sets no backend flag (PyTorch's: TF32 for convolutions only);
    # train_new.py:9-10 and 273 turn TF32 and cuDNN benchmarking on.
    BACKENDS = {"sample": Backends(),
                "train": Backends(matmul_tf32=True, cudnn_tf32=True, cudnn_benchmark=True)}
    SAMPLER_ARGS = (
        Arg("cfg", float, 1.0, "guidance scale of the last cell (ramped from 1 over the cells)"),
        Arg("flow_steps", int, 50, "Euler–Maruyama steps per cell (at least 3)"),
        Arg("kv_cache", bool, True, "key/value cache across cells"),
        Arg("autocast", str | None, None, "None, 'bf16' or 'fp16' on CUDA"),
        Arg("compile", bool | str, False, "the network's forward through torch.compile (True or a mode name)"),
        Arg("to_uint8", str, "truncate", "'truncate' as Neon's scripts, or 'round' as OliverRensu/xAR's evaluator"),
        GUIDE_SCALE,
    )
    LOSS_ARGS = (
        Arg("label_drop_prob", float | None, None, "label dropout probability; None: the model's (0.1)"),
        Arg("logit_mean", float, 0.0, "mean of the logit-normal time distribution"),
        Arg("logit_std", float, 1.0, "standard deviation of the logit-normal time distribution"),
    )
    RELEASES = {"Neon_xARL_imagenet256.pth": {}, "Neon_xARB_imagenet256.pth": {}}
    LOAD_ARGS = (
        Arg("vae_path", str | None, None, "the MAR KL-16 VAE (kl16.ckpt), needed to sample and encode"),
        Arg("model", str | None, None, "'xar_base' / 'xar_large' / 'xar_huge' to insist on"),
        Arg("dropout", float, 0.1, "attention and projection dropout of self-training (official 0.1)"),
    )
    # Neon xAR/train_new.py: AdamW(betas=(0.9, 0.96)), weight_decay 0.02 (biases and 1-D weights excluded by
    # misc.add_weight_decay), grad clip 1.0, under torch.cuda.amp.autocast() = float16 with a GradScaler.
    train_defaults = TrainDefaults(optimizer="adamw", betas=(0.9, 0.96), weight_decay=0.02, decay_1d=False,
                                   grad_clip=1.0, autocast="fp16")

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", vae_path: str | None = None,
             model: str | None = None, dropout: float = 0.1) -> Bundle:
        """path: xAR weights (any container); vae_path: kl16.ckpt (needed by sample / encode);
        model: optional 'xar_base' / 'xar_large' / 'xar_huge' to insist on; dropout: the attention / projection
        dropout of self-training (0.1 in the official training and eval scripts)."""
        net, container = checkpoint.load_xar(path, device, model=model, attn_dropout=dropout, proj_dropout=dropout)
        vae = checkpoint.load_vae(vae_path, device) if vae_path else None
        return self._bundle(net, vae, source=path, container=container)

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, vae_path: str | None = None,
             model: str | None = None, dropout: float = 0.1) -> Bundle:
        """Tiny random xAR + VAE (about 0.1M + 0.7M parameters, 32x32 images); the load arguments (the real
        checkpoints' VAE, size and dropout) do not apply and are ignored."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net, vae = XAR(TINY_XAR), AutoencoderKL(TINY_VAE)
        return self._bundle(net.to(device).eval(), vae.to(device).eval(), source=None, container="plain")

    @staticmethod
    def _bundle(net: XAR, vae: AutoencoderKL | None, source: str | None, container: str) -> Bundle:
        helpers, resolution = {}, net.cfg.img_size
        if vae is not None:
            if vae.cfg.embed_dim != net.cfg.vae_embed_dim:
                raise NeonError(f"xar: the network takes {net.cfg.vae_embed_dim}-channel latents, "
                                f"the VAE makes {vae.cfg.embed_dim}")
            helpers["vae"] = vae.requires_grad_(False)   # frozen helper: never trained, never merged
            resolution = net.cfg.grid * vae.cfg.downsample
        return Bundle(net=net, helpers=helpers, num_classes=net.cfg.class_num, resolution=resolution,
                      source=source, info={"config": dataclasses.asdict(net.cfg), "container": container})

    # -- sampling ------------------------------------------------------------------------------------------
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None, cfg: float = 1.0,
               flow_steps: int = 50, kv_cache: bool = True, autocast: str | None = None,
               compile: bool | str = False, guide_scale: float = 0.0, to_uint8: str = "truncate") -> torch.Tensor:
        """-> uint8 (B, H, W, 3) on CPU. cfg: guidance of the last cell (ramped from 1 over the cells);
        flow_steps: SDE steps per cell (>= 3); autocast: None, 'bf16' or 'fp16' for the network and the VAE
        on CUDA (the official scripts sample under float16 autocast there); CPU sampling stays float32.
        compile: the network's forward through torch.compile (neon.fastpaths; agrees with eager to rounding).
        guide_scale: ω of self-guidance by `bundle.guide`: every call steps with (1+ω)·θr − ω·θs of the
        CFG-guided drift (the flow head's velocity); 0: the guide is not run. to_uint8: how the decoded images
        become uint8 (`images_to_uint8`)."""
        net, vae = bundle.net, self._vae(bundle)
        guide = active_guide(bundle, guide_scale)
        device = next(net.parameters()).device
        labels = self._labels(bundle, labels, len(seeds)).to(device)
        if flow_steps < MIN_STEPS:
            raise NeonError(f"xar: flow_steps must be >= {MIN_STEPS} (the official sampler fails below), "
                            f"got {flow_steps}")
        if to_uint8 not in TO_UINT8:
            raise NeonError(f"xar: to_uint8 must be one of {', '.join(TO_UINT8)}; got {to_uint8!r}")
        if autocast not in AUTOCAST:
            raise NeonError(f"xar: autocast must be one of None, 'bf16', 'fp16'; got {autocast!r}")
        dtype = AUTOCAST[autocast] if device.type == "cuda" else None   # as the official scripts: CUDA only
        noise = PerImageNoise(seeds, net.cell_tokens, net.cfg.vae_embed_dim, flow_steps, device)
        with contextlib.ExitStack() as stack:
            for m in [net] if guide is None else [net, guide]:
                stack.enter_context(eval_mode(m))
                stack.enter_context(fastpaths.compiled(m, compile))
            stack.enter_context(torch.no_grad())
            z = sample_tokens(net, labels, flow_steps, float(cfg), noise, kv_cache=kv_cache, autocast=dtype,
                              guide=guide, guide_scale=float(guide_scale))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                images = vae.decode(z / LATENT_SCALE)
        return images_to_uint8(images, to_uint8)

    # -- self-training -------------------------------------------------------------------------------------
    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, 3) -> {'moments', 'moments_flip': (B, 2*16, h, w) float32, 'labels': (B,) int64},
        on CPU; the moments of the image and of its horizontal mirror, as MAR caches latents."""
        vae = self._vae(bundle)
        device = next(vae.parameters()).device
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise NeonError(f"xar: encode expects uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != bundle.resolution or images.shape[2] != bundle.resolution:
            raise NeonError(f"xar: images are {images.shape[1]}x{images.shape[2]}, the model makes "
                            f"{bundle.resolution}x{bundle.resolution}")
        labels = self._labels(bundle, labels, images.shape[0])
        x = (images.to(device).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5   # ToTensor + Normalize(0.5, 0.5)
        with torch.no_grad():
            moments, moments_flip = vae.encode(x), vae.encode(x.flip(dims=[3]))
        return {"moments": moments.float().cpu(), "moments_flip": moments_flip.float().cpu(), "labels": labels.cpu()}

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], label_drop_prob: float | None = None,
             logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
        """Flow-matching loss on a batch of `encode` output, with a random mirror choice and a fresh posterior
        sample per example (global RNG); the arguments are LOSS_ARGS."""
        net = bundle.net.train()
        device = next(net.parameters()).device
        moments = batch["moments"].to(device, torch.float32)
        flipped = batch["moments_flip"].to(device, torch.float32)
        # MAR's CachedFolder: rand < 0.5 keeps the original
        mirror = torch.rand(moments.shape[0], device=device) >= 0.5
        moments = torch.where(mirror[:, None, None, None], flipped, moments)
        x0 = posterior_sample(moments) * LATENT_SCALE
        return flow_matching_loss(net, x0, batch["labels"].to(device), label_drop_prob=label_drop_prob,
                                  logit_mean=logit_mean, logit_std=logit_std)

    def save_helpers(self, bundle: Bundle, folder: str) -> None:
        """The KL-16 VAE as kl16.ckpt, in MAR's container ({'model': state dict})."""
        atomic_save({"model": self._vae(bundle).state_dict()}, os.path.join(folder, VAE_FILE))

    def save(self, bundle: Bundle, path: str) -> None:
        checkpoint.save_xar(bundle.net.state_dict(), path, container="plain")

    # -- checks --------------------------------------------------------------------------------------------
    @staticmethod
    def _vae(bundle: Bundle) -> AutoencoderKL:
        if "vae" not in bundle.helpers:
            raise NeonError("xar: this step needs the KL-16 VAE: set load_args.vae_path (kl16.ckpt)")
        return bundle.helpers["vae"]

    @staticmethod
    def _labels(bundle: Bundle, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        if labels is None:
            raise NeonError("xar: the model is class-conditional; labels are required")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() != n:
            raise NeonError(f"xar: {labels.numel()} labels for {n} images")
        if n and (labels.min() < 0 or labels.max() >= bundle.num_classes):
            raise NeonError(f"xar: labels must be in [0, {bundle.num_classes}), got {labels.min()}..{labels.max()}")
        return labels


TO_UINT8 = ("truncate", "round")


def images_to_uint8(images: torch.Tensor, mode: str = "truncate") -> torch.Tensor:
    """VAE output (B, 3, H, W), roughly in [-1, 1] -> uint8 (B, H, W, 3) on CPU.
    'truncate': as Neon's generate_dataset.py / calculate_fid.py ((x + 1) / 2 * 255 in float32, clamp, .byte()).
    'round': as OliverRensu/xAR's engine_xar.py, which measured θr's published FIDs: (x + 1) / 2 in the decoder's
    dtype, then np.round(np.clip(x * 255, 0, 255)) (half to even, as torch.round) — about half the pixels one
    step above the truncated ones."""
    if mode == "round":
        x = ((images.detach().cpu() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8)
    else:
        x = ((images.float() + 1) / 2 * 255).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()
