"""The EDM family for the Neon core: load, tiny, sample, encode, loss, save.

- load:   an official snapshot pickle (or a file `save` wrote) -> Bundle(net = the EMA network in eval mode).
- sample: the Heun sampler with per-image seeded latents -> uint8 images, mapped as the official generate.py.
- encode: uint8 images -> the training loop's input, images / 127.5 − 1 in [-1, 1] (+ class indices).
- loss:   the loss the snapshot was trained with (EDMLoss for the EDM releases, VPLoss for VP snapshots), with
          the snapshot's augmentation pipe, reduced as the official training loop (sum per image, mean over the
          batch). The config's finetune.loss_args may override it (LOSS_ARGS below).
- save:   the official container when the network came from one (a byte-for-byte copy of that pickle with
          the weights replaced, see edm/checkpoint.py), a safetensors export for '*.safetensors', else our own
          torch.save container.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch

from edm import checkpoint
from edm.augment import TRAIN_PY_ARGS, AugmentPipe
from edm.loss import LOSSES, reduce_loss
from edm.sampler import SeededNoise, edm_sampler, latents_and_labels, to_uint8
from neon import containers, fastpaths
from neon.checkpoint import detect_format
from neon.config import check_args
from neon.errors import NeonError
from neon.family import Arg, Bundle, Family, TrainDefaults
from neon.fastpaths import Backends
from neon.guidance import GUIDE_SCALE, active_guide
from neon.testing import fan_in_rule
from neon.testing import randomize as random_weights

# The loss each preconditioner is trained with in EDM's train.py (--precond=vp|ve|edm).
DEFAULT_LOSS = {"EDMPrecond": "EDMLoss", "VPPrecond": "VPLoss", "VEPrecond": "VELoss"}

# A tiny DDPM++ (SongUNet) with every code path of the released models: attention, down/up blocks, skip
# concatenation, class and augmentation embeddings. About 190k parameters; a Heun step at 8x8 takes milliseconds.
TINY_KWARGS = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13,
                   use_fp16=False, img_channels=3)

# `build`: the DDPM++ layout of EDM's train.py --arch=ddpmpp (positional noise embedding, standard encoder and
# decoder, [1, 1] resampling), no augmentation input, and SongUNet's own default sizes unless given.
BUILD_KWARGS = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                    decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                    channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.10, augment_dim=0,
                    use_fp16=False)


class EDMFamily(Family):
    name = "edm"
    CONTAINERS = (containers.PICKLE, containers.TORCH_ZIP, containers.SAFETENSORS)   # what `load` reads
    # SinaAlemohammad/Neon edm/cal_metrics_all.py sets no backend flag (PyTorch's: TF32 for convolutions only);
    # edm/training/training_loop.py:49-51 turns TF32 off for both and cuDNN benchmarking on (--bench default).
    BACKENDS = {"sample": Backends(),
                "train": Backends(matmul_tf32=False, cudnn_tf32=False, cudnn_benchmark=True)}
    # edm_sampler's arguments (EDM's Algorithm 2 with the stochastic churn of Table 5), as generate.py names them.
    SAMPLER_ARGS = (
        Arg("num_steps", int, 18, "Heun steps N"),
        Arg("sigma_min", float, 0.002, "lowest noise level of the time steps"),
        Arg("sigma_max", float, 80.0, "highest noise level of the time steps"),
        Arg("rho", float, 7.0, "time-step exponent ρ"),
        Arg("S_churn", float, 0.0, "total noise added back (0 = the deterministic ODE sampler)"),
        Arg("S_min", float, 0.0, "lowest σ at which noise is added back"),
        Arg("S_max", float, float("inf"), "highest σ at which noise is added back"),
        Arg("S_noise", float, 1.0, "scale of the noise added back"),
        Arg("autocast", str | None, None, "None (float32, as the official code) or 'bf16' (CUDA; not bit-exact)"),
        Arg("compile", bool | str, False, "the network's forward through torch.compile (True or a mode name)"),
        Arg("channels_last", bool, False, "NHWC weights for the UNet's convolutions (GPU speed)"),
        GUIDE_SCALE,
    )
    LOSS_ARGS = (
        Arg("augment", float | None, None, "augmentation probability p (0 = off); None: the snapshot's pipe"),
        Arg("reduction", str, "sum_per_image", "'sum_per_image' (the official loop) or 'mean'"),
        Arg("loss_kwargs", dict[str, Any] | None, None, "loss constructor overrides (P_mean, P_std, sigma_data...)"),
    )
    LOAD_ARGS = (    # a snapshot pickle holds everything its network needs
        Arg("trust_architecture", bool, False, "load a pickle whose embedded source is no official release's"),
    )
    TINY_ARGS = (
        Arg("conditional", bool, True, "10 classes (True) or unconditional"),
        Arg("resolution", int, 8, "image side"),
    )
    RELEASES = {"Neon_EDM_conditional_CIFAR10.pkl": {"conditional": True},
                "Neon_EDM_unconditional_CIFAR10.pkl": {"conditional": False},
                "Neon_EDM_FFHQ.pkl": {"conditional": False},
                "edm-cifar10-32x32-cond-vp.pkl": {"conditional": True}}
    BUILD_ARGS = (   # SongUNet sizes (its constructor defaults)
        Arg("model_channels", int, 128, "base channel count"),
        Arg("channel_mult", list[int], [1, 2, 2, 2], "channel multiplier per resolution level"),
        Arg("channel_mult_emb", int, 4, "embedding width multiplier"),
        Arg("num_blocks", int, 4, "residual blocks per level"),
        Arg("attn_resolutions", list[int], [16], "resolutions with self-attention"),
        Arg("dropout", float, 0.10, "dropout probability of the residual blocks"),
        Arg("label_dropout", float, 0.0, "probability of dropping the class label in training"),
    )
    # EDM's train.py: torch.optim.Adam(lr, betas=[0.9, 0.999], eps=1e-8), no weight decay, no clipping
    # (the loop only replaces NaN/Inf gradients), float32 (--fp16=False for all three rows).
    train_defaults = TrainDefaults(optimizer="adam", betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   grad_clip=None)

    # -- networks ---------------------------------------------------------------------------------------
    def load(self, path: str, device: torch.device | str = "cpu", trust_architecture: bool = False) -> Bundle:
        """trust_architecture: load a pickle whose embedded source is not an official release's (warned)."""
        net, info = checkpoint.load_snapshot(path, device, bool(trust_architecture))
        return _bundle(net, info, source=os.fspath(path))

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, conditional: bool = True,
             resolution: int = 8, trust_architecture: bool = False) -> Bundle:
        """A random tiny EDMPrecond + SongUNet (DDPM++); `conditional` gives it 10 classes. trust_architecture
        (a load argument) has nothing to act on: the network is built from this project's code."""
        init_kwargs = dict(TINY_KWARGS, img_resolution=int(resolution), label_dim=10 if conditional else 0)
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
            torch.manual_seed(seed)
            net = checkpoint.build_network("EDMPrecond", init_kwargs, "cpu")
        randomize(net, seed)
        info = dict(format=None, class_name="EDMPrecond", init_kwargs=init_kwargs, loss_class="EDMLoss",
                    loss_kwargs={}, augment_kwargs=dict(p=0.12, **TRAIN_PY_ARGS))
        return _bundle(net.to(device).eval(), info, source=None)

    def build(self, device: torch.device | str = "cpu", seed: int = 0, resolution: int = 32, img_channels: int = 3,
              num_classes: int = 0, **unet_kwargs) -> Bundle:
        """A freshly built EDMPrecond + SongUNet (DDPM++) with the official initialisation (not `tiny`'s random
        one), to train from scratch, e.g. the Fashion-MNIST study (16×16, 1 channel, 10 classes).

        resolution, img_channels: image side and colour channels of the images `sample` returns.
        num_classes: 0 = unconditional, else class-conditional on labels in [0, num_classes).
        unet_kwargs: SongUNet sizes, BUILD_ARGS. No augmentation input: the bundle trains with plain EDMLoss
        (P_mean −1.2, P_std 1.2, σ_data 0.5), no augment pipe. The same seed gives the same weights."""
        check_args(self.BUILD_ARGS, unet_kwargs, "edm build")
        init_kwargs = dict(BUILD_KWARGS, img_resolution=int(resolution), img_channels=int(img_channels),
                           label_dim=int(num_classes), **unet_kwargs)
        with torch.random.fork_rng(devices=[]):   # leave the caller's RNG alone
            torch.manual_seed(seed)
            net = checkpoint.build_network("EDMPrecond", init_kwargs, "cpu")
        info = dict(format=None, class_name="EDMPrecond", init_kwargs=init_kwargs, loss_class="EDMLoss",
                    loss_kwargs={}, augment_kwargs=None)
        return _bundle(net.to(device).eval(), info, source=None)

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None,
               autocast: str | None = None, compile: bool | str = False, channels_last: bool = False,
               guide_scale: float = 0.0, **sampler_args) -> torch.Tensor:
        """One image per seed -> uint8 (B, H, W, 3) on CPU.

        labels: int64 (B,) class indices for a conditional model (required), None for an unconditional one.
        sampler_args, autocast: SAMPLER_ARGS. compile: the network's forward through torch.compile;
        channels_last: NHWC weights for the UNet's convolutions (both faster on GPUs; images agree with eager to
        rounding). guide_scale: ω of self-guidance by `bundle.guide` (every denoiser evaluation, the Heun
        correction's too, is (1+ω)·D_θr − ω·D_θs); 0: the guide is not run.
        """
        net = bundle.net
        guide = active_guide(bundle, guide_scale)
        device = _device(net)
        class_labels = _one_hot(bundle, labels, len(seeds), device)
        if len(seeds) == 0:
            return torch.zeros((0, net.img_resolution, net.img_resolution, net.img_channels), dtype=torch.uint8)
        noise = SeededNoise(seeds, device)
        latents = noise.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
        networks = [net] if guide is None else [net, guide]
        was_training = [m.training for m in networks]
        try:
            with contextlib.ExitStack() as fast:
                fast.enter_context(_autocast(autocast, device))
                for m in networks:
                    m.eval()
                    fast.enter_context(fastpaths.channels_last(m, channels_last))
                    fast.enter_context(fastpaths.compiled(m, compile))
                images = edm_sampler(net, latents, class_labels, randn_like=noise.randn_like, guide=guide,
                                     guide_scale=float(guide_scale), **sampler_args)
        finally:
            for m, mode in zip(networks, was_training):
                m.train(mode)
        return to_uint8(images).cpu()

    def labels_from_seeds(self, bundle: Bundle, seeds: Sequence[int]) -> torch.Tensor | None:
        """The class index the official generate.py draws for each seed (after the latents, from the same
        per-seed generator): int64 (B,), or None for an unconditional model."""
        net = bundle.net
        return latents_and_labels(seeds, net.img_channels, net.img_resolution, net.label_dim)[1]

    # -- training -------------------------------------------------------------------------------------------
    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, C) -> {'images': float32 (B, C, H, W) in [-1, 1], 'labels': int64 (B,) if conditional},
        the official training loop's `images.to(float32) / 127.5 - 1`."""
        net = bundle.net
        expected = (net.img_resolution, net.img_resolution, net.img_channels)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise NeonError(f"edm encode: expected uint8 images (B, {', '.join(map(str, expected))}), got "
                            f"{images.dtype} {tuple(images.shape)}")
        out = {"images": images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1}
        if bundle.conditional:
            _check_labels(bundle, labels, images.shape[0])
            out["labels"] = labels.to(torch.int64).cpu()
        return out

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], augment: float | None = None,
             reduction: str = "sum_per_image", loss_kwargs: dict | None = None) -> torch.Tensor:
        """The official training objective on a batch of `encode`'s output (net in train mode: dropout on);
        the arguments are LOSS_ARGS."""
        net = bundle.net
        device = _device(net)
        images = batch["images"].to(device, torch.float32)
        labels = None
        if bundle.conditional:
            if "labels" not in batch:
                raise NeonError("edm loss: conditional model but the batch has no 'labels'")
            labels = _one_hot(bundle, batch["labels"], images.shape[0], device)
        loss_fn = make_loss(bundle.info, loss_kwargs)
        pipe = make_augment_pipe(bundle.info, augment)
        per_element = loss_fn(net, images, labels, augment_pipe=pipe)
        return reduce_loss(per_element, reduction)

    def save(self, bundle: Bundle, path: str) -> None:
        info = bundle.info
        if os.fspath(path).endswith(".safetensors"):
            checkpoint.export_safetensors(bundle.net, path, info["class_name"], info["init_kwargs"])
        elif bundle.source is not None and os.path.isfile(bundle.source) and detect_format(bundle.source) == "pickle":
            checkpoint.save_pickle(bundle.net, bundle.source, path, bool(info.get("trust_architecture")))
        else:
            extra = {k: info[k] for k in ("loss_class", "loss_kwargs", "augment_kwargs") if k in info}
            checkpoint.save_container(bundle.net, path, info["class_name"], info["init_kwargs"], **extra)


# ---------------------------------------------------------------------------------------------------------

def _bundle(net: torch.nn.Module, info: dict, source: str | None) -> Bundle:
    return Bundle(net=net, num_classes=int(net.label_dim), resolution=int(net.img_resolution),
                  channels=int(net.img_channels), source=source, info=dict(info))


def make_loss(info: dict, overrides: dict | None = None):
    """The loss object: the snapshot's recorded loss (else the one its preconditioner is trained with)."""
    name = info.get("loss_class") or DEFAULT_LOSS.get(info.get("class_name"))
    if name not in LOSSES:
        raise NeonError(f"edm: no training loss known for {info.get('class_name')} (loss {name!r})")
    kwargs = dict(info.get("loss_kwargs") or {})
    kwargs.update(overrides or {})
    try:
        return LOSSES[name](**kwargs)
    except TypeError as e:
        raise NeonError(f"edm: bad {name} arguments: {e}") from None


def make_augment_pipe(info: dict, p: float | None = None) -> AugmentPipe | None:
    """The snapshot's augmentation pipe; p (loss_args 'augment') replaces its probability, 0 turns it off."""
    recorded = info.get("augment_kwargs")
    if p is None:
        return AugmentPipe(**recorded) if recorded else None
    if float(p) == 0:
        return None
    if not 0 < float(p) <= 1:
        raise NeonError(f"edm loss_args.augment: expected a probability in [0, 1], got {p}")
    if int(info.get("init_kwargs", {}).get("augment_dim", 0) or 0) != 9:
        raise NeonError("edm loss_args.augment: the network has no 9-dim augmentation input (augment_dim)")
    kwargs = dict(recorded or TRAIN_PY_ARGS)
    kwargs["p"] = float(p)
    return AugmentPipe(**kwargs)


def _tiny_rule(module, name, full_name, p):
    """The fixtures' rule: GroupNorm weight 1 + 0.1·N(0,1), bias 0.05·N(0,1); other tensors the fan-in rule."""
    if type(module).__name__ == "GroupNorm":
        return (lambda z: 1 + 0.1 * z) if name == "weight" else (lambda z: 0.05 * z)
    return fan_in_rule(module, name, full_name, p)


def randomize(net: torch.nn.Module, seed: int) -> None:
    """Every learnable tensor of a tiny EDM network from `seed` (neon.testing.randomize, the fixtures' rule)."""
    random_weights(net, seed, _tiny_rule)


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _check_labels(bundle: Bundle, labels, batch: int) -> None:
    if labels is None:
        raise NeonError(f"edm: this model is class-conditional ({bundle.num_classes} classes): labels are required")
    if not isinstance(labels, torch.Tensor) or labels.shape != (batch,) or labels.is_floating_point():
        raise NeonError(f"edm: labels must be an integer tensor of shape ({batch},), got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= bundle.num_classes):
        raise NeonError(f"edm: labels must lie in [0, {bundle.num_classes}), "
                        f"got {int(labels.min())}..{int(labels.max())}")


def _one_hot(bundle: Bundle, labels, batch: int, device) -> torch.Tensor | None:
    """(B,) class indices -> (B, label_dim) float32 one-hot; None for an unconditional model."""
    if not bundle.conditional:
        if labels is not None:
            raise NeonError("edm: this model is unconditional; pass labels=None")
        return None
    _check_labels(bundle, labels, batch)
    return torch.nn.functional.one_hot(labels.to(torch.int64), bundle.num_classes).to(device, torch.float32)


def _autocast(mode: str | None, device: torch.device):
    if mode is None:
        return torch.autocast(device.type, enabled=False)
    if mode != "bf16":
        raise NeonError(f"edm sampler: autocast must be None or 'bf16', got {mode!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)
