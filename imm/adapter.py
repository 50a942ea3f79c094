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

import contextlib
import os
from collections.abc import Sequence

import torch

from imm.checkpoint import build_network, load_network, save_network
from imm.loss import IMMLoss
from imm.sampler import check_labels, one_hot, sample_latents
from imm.vae import load_vae, tiny_vae
from neon import containers, fastpaths
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults
from neon.fastpaths import Backends
from neon.guidance import GUIDE_SCALE, active_guide
from neon.testing import randomize

# IMMLoss's arguments at the Neon fine-tuning settings (imm/configs/im256.yaml `loss:`) where it sets them;
# configs override them via finetune.loss_args.
LOSS_ARGS = (
    Arg("sigma", float, 1.0, "kernel bandwidth"),
    Arg("sample_t_mode", str, "uniform", "'uniform' in t (Neon) or 'lognormal' in eta (IMM's default)"),
    Arg("P_mean", float, -1.1, "lognormal mode: log-eta mean"),
    Arg("P_std", float, 2.0, "lognormal mode: log-eta standard deviation"),
    Arg("matrix_size", int, 4, "M: samples per group sharing (t, r, s)"),
    Arg("sample_repeat", int, 1, "only 1 (the official code breaks otherwise)"),
    Arg("a", float, 2, "wout: alpha_t^a"),
    Arg("b", float, 4, "wout: sigmoid(b - logsnr_t)"),
    Arg("k", int, 12, "r = t one step of eta_high / 2^k earlier"),
    Arg("label_dropout", float, 0.1, "probability of training f_st on the null class"),
    Arg("min_tr_gap", float | None, 1e-4, "r <= t - min_tr_gap"),
)
LOSS_DEFAULTS = {a.name: a.default for a in LOSS_ARGS if a.name not in ("P_mean", "P_std")}

# A DiT of ~60k parameters on 4x4x4 latents (32x32 images through the tiny VAE), same code paths as DiT-XL/2.
TINY_CONFIG = dict(img_resolution=4, img_channels=4, label_dim=10, model_type="DiT", patch_size=2, hidden_size=32,
                   depth=2, num_heads=2, mlp_ratio=4.0, num_classes=10, s_embed=True, noise_schedule="fm",
                   f_type="euler_fm", temb_type="stride", time_scale=1000, sigma_data=0.5, eps=0.0, T=0.994)


def _tiny_rule(module, name, full_name, p):
    """DiT's own init zeroes the output layers, which would make the tiny network the identity map: matrices
    N(0, 1/fan_in), label table N(0, 0.5²), vectors N(0, 0.05²); the frozen sin-cos pos_embed keeps its table."""
    if full_name.endswith("pos_embed"):
        return None
    std = 0.5 if full_name.endswith("embedding_table.weight") else p[0].numel() ** -0.5 if p.ndim >= 2 else 0.05
    return lambda z: z * std


class IMMFamily(Family):
    name = "imm"
    CONTAINERS = (containers.PICKLE, containers.TORCH_ZIP)   # what `load` reads
    # SinaAlemohammad/Neon imm/generate_fid_neon.py:134-138: TF32 on for both, cuDNN benchmark (eval.cudnn_benchmark
    # true); imm/training/training_loop.py:161-164 with im256.yaml: TF32 off (enable_tf32 false), benchmark on.
    BACKENDS = {"sample": Backends(matmul_tf32=True, cudnn_tf32=True, cudnn_benchmark=True),
                "train": Backends(matmul_tf32=False, cudnn_tf32=False, cudnn_benchmark=True)}
    SAMPLER_ARGS = (
        Arg("steps", int, 8, "flow-map jumps (the release presets: 1, 2, 4, 8)"),
        Arg("cfg", float | None, 1.5, "guidance scale (None = no guidance)"),
        Arg("autocast", str | None, None, "None (float32 DiT) or 'bf16' / 'fp16' on CUDA"),
        Arg("compile", bool | str, False, "the DiT's forward through torch.compile (True or a mode name)"),
        GUIDE_SCALE,
    )
    LOSS_ARGS = LOSS_ARGS
    RELEASES = {"Neon_imm_imagenet256.pkl": {}}
    LOAD_ARGS = (
        Arg("vae_path", str | None, None, "local diffusers folder of sd-vae-ft-ema (None: the hub id; 'tiny')"),
        Arg("temb_type", str | None, None, "override the recorded second-time input ('identity' for s_a1)"),
        Arg("vae_fp16", bool, True, "run the SD-VAE in float16"),
        Arg("trust_architecture", bool, False, "load a pickle whose embedded source is no official release's"),
    )
    train_defaults = TrainDefaults(optimizer="adamw", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   grad_clip=None, autocast="fp16")

    # -- networks ------------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", vae_path: str | None = None,
             temb_type: str | None = None, vae_fp16: bool = True, trust_architecture: bool = False) -> Bundle:
        """path: IMM checkpoint; vae_path: local diffusers folder of sd-vae-ft-ema (default: the hub id), or
        'tiny' for the tiny VAE (smoke runs reloading a tiny network); temb_type: override the recorded
        second-time input ('identity' for imagenet256_s_a1.pkl); trust_architecture: load a pickle whose
        embedded source is not an official release's (warned)."""
        net = load_network(path, device, temb_type, bool(trust_architecture))
        vae = tiny_vae(device=device) if vae_path == "tiny" else load_vae(vae_path, device, fp16=vae_fp16)
        bundle = self._bundle(net, vae, source=str(path))
        if trust_architecture:   # `save` copies this file, whose source the caller accepted
            bundle.info["trust_architecture"] = True
        return bundle

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, vae_path: str | None = None,
             temb_type: str | None = None, vae_fp16: bool = True, trust_architecture: bool = False) -> Bundle:
        """A ~60k-parameter IMMPrecond randomly initialised from `seed` and the ~70k-parameter tiny
        AutoencoderKL (always the same one, so `load(..., vae_path='tiny')` decodes a saved tiny network alike).
        vae_path, vae_fp16 and trust_architecture are accepted for config compatibility and ignored."""
        net = build_network(TINY_CONFIG, "cpu", temb_type)
        randomize(net, seed, _tiny_rule)
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
               compile: bool | str = False, guide_scale: float = 0.0) -> torch.Tensor:
        """seeds (B,) + labels int64 (B,) -> uint8 (B, H, W, 3) on the CPU. steps: flow-map jumps (1, 2, 4, 8);
        cfg: guidance scale (None = no guidance); autocast: None (float32 DiT) or 'bf16' / 'fp16' on CUDA;
        compile: the DiT's forward through torch.compile (neon.fastpaths; images agree with eager to rounding).
        guide_scale: ω of self-guidance by `bundle.guide`: each jump uses (1+ω)·F_θr − ω·F_θs, each F with the
        same cfg; 0: the guide is not run.

        The batch runs through the DiT and the VAE decoder at once, as the official sampler. batch_invariant:
        compute the images one at a time instead (BLAS, oneDNN and CUDA pick kernels, and so their rounding, by
        batch size), so that an image does not depend on the batch it was drawn in.
        """
        if batch_invariant and len(seeds) > 1:
            labels = None if labels is None else torch.as_tensor(labels)
            return torch.cat([self.sample(bundle, [s], None if labels is None else labels[i:i + 1], steps, cfg,
                                          autocast, compile=compile, guide_scale=guide_scale)
                              for i, s in enumerate(seeds)])
        net, guide = _precond(bundle.net), active_guide(bundle, guide_scale)
        guide = None if guide is None else _precond(guide)
        with contextlib.ExitStack() as fast:
            for m in [net] if guide is None else [net, guide]:
                fast.enter_context(fastpaths.compiled(m.model, compile))
            latents = sample_latents(net, seeds, labels, steps=steps, cfg=cfg, autocast=autocast, guide=guide,
                                     guide_scale=guide_scale)
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

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], **loss_args) -> torch.Tensor:
        """Mean IMM loss over the batch's groups of `matrix_size` (the per-rank batch must be a multiple of it);
        loss_args: LOSS_ARGS. Draws, in order, from the global RNG: the posterior latents, then the loss's
        times, label dropout and noise (the official order)."""
        loss_fn = IMMLoss(**{**LOSS_DEFAULTS, **loss_args})
        net = _precond(bundle.net)
        device = next(net.parameters()).device
        y = bundle.helpers["vae"].moments_to_latents(batch["moments"].to(device))
        labels = one_hot(batch["labels"].to(device), net.label_dim)
        return loss_fn(bundle.net, y, labels).mean()

    def save_helpers(self, bundle: Bundle, folder: str) -> None:
        """The SD-VAE as the diffusers folder sd-vae-ft-ema (what load_args.vae_path names)."""
        bundle.helpers["vae"].vae.save_pretrained(os.path.join(folder, "sd-vae-ft-ema"))

    def save(self, bundle: Bundle, path: str) -> None:
        save_network(_precond(bundle.net), path, template=bundle.source,
                     trust_architecture=bool(bundle.info.get("trust_architecture")))


def _precond(net: torch.nn.Module) -> torch.nn.Module:
    """The IMMPrecond inside a DDP wrapper, or the network itself."""
    return getattr(net, "module", net)
