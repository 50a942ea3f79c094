"""The VAR family as the Neon core sees it: load / tiny / sample / encode / loss / save.

θ is the VAR transformer (`bundle.net`); the VQVAE is a frozen helper. Self-training data are the synthetic
images after the official loader's deterministic 1.125x Lanczos resize (`encode`, cached by the core); every
step crops them at random, VQ-encodes the crops in float32 and computes VAR's teacher-forced cross-entropy with
label dropout (`loss`; `var.augment`, `var.loss`), as the official trainer does on each batch it reads.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from neon import containers
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults
from neon.fastpaths import Backends
from neon.guidance import GUIDE_SCALE, active_guide
from var import augment, checkpoint
from var.invariant import batch_invariant as batch_invariant_mode
from var.loss import var_loss
from var.model import VAR, unwrap
from var.sampler import sample as var_sample
from var.vqvae import VQVAE

VAE_FILE = "vae_ch160v4096z32.pth"
AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

# A tiny VQVAE + VAR with every code path of the releases (partially shared φ, attention in the VAE, L2-normed
# attention, AdaLN): 16x16 images, 4 scales, 30 tokens, a 64-entry codebook, 10 classes.
TINY_VQVAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, share_quant_resi=4)
TINY_VAR = dict(num_classes=10, depth=2, embed_dim=64, num_heads=2, attn_l2_norm=True, drop_path_rate=0.0)
TINY_PATCH_NUMS = (1, 2, 3, 4)


class VARFamily(Family):
    name = "var"
    CONTAINERS = (containers.TORCH_ZIP, containers.LEGACY_TORCH)   # what `load` reads
    # SinaAlemohammad/Neon VAR generate_dataset.py / generate_and_fid_neon.py set only cudnn.benchmark = False
    # (PyTorch's TF32: convolutions only); train.py's arg_util (tf32 True, pg 0) turns TF32 and benchmarking on.
    BACKENDS = {"sample": Backends(cudnn_benchmark=False),
                "train": Backends(matmul_tf32=True, cudnn_tf32=True, cudnn_benchmark=True)}
    # autoregressive_infer_cfg's arguments (its defaults), plus how the images are computed.
    SAMPLER_ARGS = (
        Arg("cfg", float, 1.5, "classifier-free guidance scale (ramped linearly over the scales)"),
        Arg("top_k", int, 0, "sample among the k most likely tokens (0 = all)"),
        Arg("top_p", float, 0.0, "nucleus sampling mass (0 = off)"),
        Arg("more_smooth", bool, False, "Gumbel-softmax smoothing of the sampled tokens"),
        Arg("batch", int | None, None, "images per network call (memory only; images do not depend on it)"),
        Arg("autocast", str | None, None, "None, 'bf16' or 'fp16' on CUDA"),
        Arg("use_cache", bool, True, "key/value cache across scales"),
        GUIDE_SCALE,
    )
    LOSS_ARGS = (
        Arg("label_smooth", float, 0.0, "label smoothing of the token cross-entropy"),
        Arg("cond_drop_rate", float | None, None, "label dropout probability; None: the model's (0.1)"),
        Arg("hflip", bool, False, "random horizontal flip before the crop (official --hflip; Neon's scripts: off)"),
    )
    LOAD_ARGS = (
        Arg("vae_path", str | None, None, "the VQVAE file; None: vae_ch160v4096z32.pth beside the checkpoint"),
        Arg("patch_nums", list[int] | None, None, "token-map sides per scale; None: read from the checkpoint"),
    )
    TINY_ARGS = (Arg("shared_aln", bool, False, "one AdaLN shared by all blocks (d36's --saln=1)"),)
    RELEASES = {"Neon_VARd16_imagenet256.pth": {}, "Neon_VARd36_imagenet512.pth": {}}
    # Official VAR / Neon fine-tuning: AdamW(0.9, 0.95), weight decay 0 (Neon's train.py), grad clip 2.0 (tclip),
    # and fp16 autocast with a GradScaler: both Neon scripts pass --fp16=1 (run_var_imagenet_256.sh / _512.sh;
    # utils/amp_sc.py AmpOptimizer: 1 = fp16 + scaler, 2 = bf16). finetune.optimizer.autocast: bf16 is the option.
    # AmpOptimizer's scaler: GradScaler(init_scale=2**11, growth_interval=1000), its scale held at 2**15 or below.
    train_defaults = TrainDefaults(optimizer="adamw", betas=(0.9, 0.95), weight_decay=0.0, grad_clip=2.0,
                                   autocast="fp16", scaler_init_scale=2.0 ** 11, scaler_growth_interval=1000,
                                   scaler_max_scale=2.0 ** 15)
    # Label num_classes is the class embedding's unconditional row (classifier-free guidance); the official
    # sampler takes it as a label, so a label list may ask for unconditional images.
    allows_null_class = True

    # ----------------------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", vae_path: str | None = None,
             patch_nums: Sequence[int] | None = None) -> Bundle:
        """A VAR state dict (var_d16.pth, var_d36.pth, a Neon file or one saved here) + the VQVAE file
        (`vae_path`; default: vae_ch160v4096z32.pth beside `path`) -> Bundle in eval mode on `device`."""
        if vae_path is None:
            vae_path = os.path.join(os.path.dirname(os.path.abspath(path)), VAE_FILE)
            if not os.path.isfile(vae_path):
                raise NeonError(f"var: the VQVAE is needed too: set load_args.vae_path (no {VAE_FILE} beside {path})")
        var, var_kwargs = checkpoint.load_var(path, device, patch_nums=patch_nums)
        vae, vae_kwargs = checkpoint.load_vqvae(vae_path, var.patch_nums, device)
        return self._bundle(var, vae, source=path, var_kwargs=var_kwargs, vae_kwargs=vae_kwargs, vae_path=vae_path)

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, shared_aln: bool = False,
             vae_path: str | None = None, patch_nums: Sequence[int] | None = None) -> Bundle:
        """A randomly initialised tiny VQVAE + VAR (about 0.5 M parameters), the same from the same seed.
        A run config's load_args (vae_path, patch_nums) are accepted and ignored: the tiny model has its own."""
        var_kwargs = dict(TINY_VAR, shared_aln=shared_aln, patch_nums=TINY_PATCH_NUMS)
        vae_kwargs = dict(TINY_VQVAE, v_patch_nums=TINY_PATCH_NUMS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = VQVAE(**vae_kwargs)
            var = VAR(vae, **var_kwargs)
            # Gates and head larger than the official init (1e-5, 0.02) so that every part moves the outputs.
            var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0)
        var_kwargs.update(vocab_size=vae.vocab_size, Cvae=vae.Cvae)
        return self._bundle(var.to(device).eval(), vae.to(device).eval(), source=None,
                            var_kwargs=var_kwargs, vae_kwargs=vae_kwargs, vae_path=None)

    @staticmethod
    def _bundle(var: VAR, vae: VQVAE, source, var_kwargs, vae_kwargs, vae_path) -> Bundle:
        if var.Cvae != vae.Cvae or var.V != vae.vocab_size:
            raise NeonError(f"var: the VQVAE (V={vae.vocab_size}, Cvae={vae.Cvae}) does not fit the VAR "
                            f"(V={var.V}, Cvae={var.Cvae})")
        return Bundle(net=var, helpers={"vae": vae}, num_classes=var.num_classes, resolution=vae.resolution,
                      source=source, info={"var_kwargs": var_kwargs, "vae_kwargs": vae_kwargs, "vae_path": vae_path})

    # ----------------------------------------------------------------------------------------------------
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None, cfg: float = 1.5,
               top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, batch: int | None = None,
               autocast: str | None = None, use_cache: bool = True, batch_invariant: bool = False,
               guide_scale: float = 0.0) -> torch.Tensor:
        """One image per seed -> uint8 (B, H, W, 3) on CPU.

        labels: int64 (B,) in [0, num_classes] (num_classes = the null class, i.e. unconditional); required.
        cfg, top_k, top_p, more_smooth: as the official autoregressive_infer_cfg (defaults are its defaults).
        batch: images per network call (default: all). autocast: None, 'bf16' or 'fp16' on CUDA (Neon's FID
        scripts sample under fp16 autocast, its generate_dataset.py in float32); CPU sampling stays float32.
        The batch runs with the fastest kernels (oneDNN on), whose last bits may depend on the batch shape.
        batch_invariant: an image that does not depend on its batch: per-image arithmetic on CPU
        (var.invariant), one image at a time on other devices. Images are quantised as Neon's scripts write
        their PNGs: floor(255·x) of x in [0, 1]. guide_scale: ω of self-guidance by `bundle.guide`: tokens are
        drawn from (1+ω)·ℓ_θr − ω·ℓ_θs of the CFG-guided logits; 0: the guide is not run.
        """
        var, vae = unwrap(bundle.net), bundle.helpers["vae"]
        guide = active_guide(bundle, guide_scale)
        guide = None if guide is None else unwrap(guide)
        labels = self._check_labels(bundle, seeds, labels)
        device = next(var.parameters()).device
        step = len(seeds) if not batch else int(batch)
        if batch_invariant and device.type != "cpu":
            step = 1
        out = []
        networks = [var] if guide is None else [var, guide]
        was_training = [m.training for m in networks]
        for m in networks:
            m.eval()
        try:
            per_image_arithmetic = batch_invariant and device.type == "cpu"
            with self._autocast(device, autocast), batch_invariant_mode(per_image_arithmetic):
                for i in range(0, len(seeds), max(step, 1)):
                    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds[i:i + step]]
                    img = var_sample(var, vae, labels[i:i + step].to(device), gens, cfg=float(cfg),
                                     top_k=int(top_k), top_p=float(top_p), more_smooth=bool(more_smooth),
                                     use_cache=use_cache, guide=guide, guide_scale=float(guide_scale))
                    out.append(img.float().clamp_(0, 1).mul_(255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        finally:
            for m, mode in zip(networks, was_training):
                m.train(mode)
        return torch.cat(out) if out else torch.zeros(0, bundle.resolution, bundle.resolution, 3, dtype=torch.uint8)

    @staticmethod
    def _check_labels(bundle: Bundle, seeds: Sequence[int], labels) -> torch.Tensor:
        if labels is None:
            raise NeonError("var: VAR is class-conditional: labels are required (num_classes = unconditional)")
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise NeonError(f"var: labels must be integers, got {labels.dtype}")
        if labels.shape[0] != len(seeds):
            raise NeonError(f"var: {len(seeds)} seeds but {labels.shape[0]} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() > bundle.num_classes):
            raise NeonError(f"var: labels must lie in [0, {bundle.num_classes}], got {labels.min()}..{labels.max()}")
        return labels.long()

    @staticmethod
    def _autocast(device: torch.device, autocast: str | None):
        if autocast not in AUTOCAST:
            raise NeonError(f"var: autocast must be one of None, 'bf16', 'fp16'; got {autocast!r}")
        if autocast is None or device.type != "cuda":     # as the official scripts: autocast on CUDA only
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AUTOCAST[autocast])

    # ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 (B, R, R, 3) images + labels -> {'images': uint8 (B, R', R', 3), 'labels': (B,)} with R the model's
        resolution and R' = round(1.125 R): the official loader's Lanczos resize (`var.augment.lanczos_resize`),
        the deterministic part of its augmentation; the random crop and the VQ encoding happen in `loss`."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise NeonError(f"var: encode expects uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
        R = bundle.resolution
        if images.shape[1] != R or images.shape[2] != R:
            raise NeonError(f"var: images are {images.shape[1]}x{images.shape[2]}, the model makes {R}x{R}")
        labels = self._check_labels(bundle, range(images.shape[0]), labels)
        return {"images": augment.lanczos_resize(images, R), "labels": labels.cpu()}

    @torch.no_grad()
    def tokens(self, bundle: Bundle, images: torch.Tensor, hflip: bool = False) -> torch.Tensor:
        """Cached uint8 images (B, R', R', 3) -> VQ tokens (B, L) int64 of a random R x R crop of each (random
        draws from the global RNG). As the official trainer, the VQVAE runs in float32 outside any autocast."""
        vae = bundle.helpers["vae"]
        device = next(vae.parameters()).device
        x = augment.to_pm1(augment.random_crop(images.to(device), bundle.resolution, hflip))
        with torch.autocast(device.type, enabled=False):
            return torch.cat(vae.img_to_idxBl(x), dim=1)

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], label_smooth: float = 0.0,
             cond_drop_rate: float | None = None, hflip: bool = False) -> torch.Tensor:
        """Teacher-forced cross-entropy over all tokens (official weights 1/L, batch mean), label dropout 0.1, on
        the tokens of a fresh random crop of each cached image; the arguments are LOSS_ARGS."""
        if "images" not in batch:
            raise NeonError("var: the examples hold no 'images' (VQ tokens of an older version's cache?): encode "
                            "the synthetic set again with this version's `encode`")
        var, vae = bundle.net, bundle.helpers["vae"]
        device = next(var.parameters()).device
        return var_loss(var, vae, self.tokens(bundle, batch["images"], bool(hflip)), batch["labels"].to(device),
                        label_smooth=float(label_smooth), cond_drop_rate=cond_drop_rate)

    def save_helpers(self, bundle: Bundle, folder: str) -> None:
        """The VQVAE as vae_ch160v4096z32.pth, where `load` looks for it beside the VAR checkpoint."""
        checkpoint.save_state_dict(bundle.helpers["vae"], os.path.join(folder, VAE_FILE))

    def save(self, bundle: Bundle, path: str) -> None:
        """Write the VAR's weights as a plain state dict, the container of var_d16.pth and Neon's snapshots."""
        checkpoint.save_state_dict(unwrap(bundle.net), path)
