"""The adapter protocol: what a model family tells the Neon core, and the registry that finds families by name.

A family (edm, var, xar, imm, or a test family) implements `Family`. Everything else — sharding seeds across
ranks, caching encoded examples, DDP, EMA, merging, metrics, sweeps — belongs to the core. The core never
imports a family package: families are found through the `neon.families` entry-point group (pyproject.toml)
or registered at run time with `register()`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from neon.registry import Registry, load_attribute


@dataclasses.dataclass
class Bundle:
    """The networks of one checkpoint, as a family loaded them.

    net:         the one module that self-training updates and the merge touches (the EMA network where the
                 checkpoint has one). Its `state_dict()` keys are the keys of the merged tensors.
    helpers:     frozen modules the family needs around `net` (VAE, VQ tokenizer); never trained, never merged.
    num_classes: 0 for an unconditional model, else the number of real classes (labels in [0, num_classes)).
    resolution:  side of the square uint8 images that `sample` returns.
    channels:    colour channels of those images (and of the images `encode` takes): 3 (RGB) or 1 (grey).
    source:      the file `net` was loaded from, or None for a freshly built network. Families whose official
                 container cannot be rebuilt from scratch (EDM/IMM pickles) use it as the template in `save`.
    info:        family-specific facts (constructor kwargs, container layout) that `save` needs.
    """
    net: torch.nn.Module
    helpers: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)
    num_classes: int = 0
    resolution: int = 0
    channels: int = 3
    source: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to(self, device) -> "Bundle":
        self.net.to(device)
        for h in self.helpers.values():
            h.to(device)
        return self


@dataclasses.dataclass
class TrainDefaults:
    """A family's official self-training recipe; configs override any field."""
    optimizer: str = "adamw"                 # 'adam' or 'adamw'
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_1d: bool = True                    # False: biases and other 1-D parameters get no weight decay (MAR/xAR)
    grad_clip: float | None = None           # max global grad norm; None = no clipping
    autocast: str | None = None              # 'bf16' / 'fp16' on GPU where the official code uses it


@runtime_checkable
class Family(Protocol):
    """The five things a family tells the core, plus a tiny network for smoke runs and tests."""

    name: str
    train_defaults: TrainDefaults

    def load(self, path: str, device: torch.device | str = "cpu", **load_args) -> Bundle:
        """Official checkpoint file (or one this project saved) -> networks in eval mode on `device`.
        `load_args` come from the config's `load_args` (e.g. the path of a VAE or tokenizer)."""
        ...

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, **load_args) -> Bundle:
        """A randomly initialised network of a few thousand to a few hundred thousand parameters, with the
        same code paths as the released models; used by `neon run --smoke` and by tests."""
        ...

    def sample(self, bundle: Bundle, seeds: Sequence[int], labels: torch.Tensor | None,
               **sampler_args) -> torch.Tensor:
        """Generate one image per seed -> uint8 (B, H, W, C) on CPU, C = 3 (RGB) or 1 (grey).

        Every random draw for image i comes from a generator seeded with seeds[i], never from a stream shared by
        the batch, so the images of a batch depend on its seeds and labels (in order), not on the rank or the
        world size; the core cuts the seed list into fixed batches before dealing them to ranks. Run the batch
        through the network at once (the fast path): its floating-point rounding may then depend on the batch
        composition, since BLAS, oneDNN and CUDA pick kernels by shape. A family may also take a keyword
        `batch_invariant: bool = False`; with True each image must come out as if sampled alone (per-image
        arithmetic or one image at a time). Without it the core calls `sample` seed by seed when asked for
        batch-invariant images. `labels` is int64 (B,) for a conditional model and None for an unconditional one.
        """
        ...

    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Synthetic images uint8 (B, H, W, C) + labels -> training examples: a dict of tensors whose first
        dimension is B (VAE latents, VQ token indices, or the images in the network's range). The core calls
        this once per image and caches the result."""
        ...

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The family's own training loss (a scalar, mean over the batch) on a batch of `encode`'s output,
        computed with `bundle.net` in train mode. Random draws use the global torch RNG, as the official code."""
        ...

    def save(self, bundle: Bundle, path: str) -> None:
        """Write `bundle.net`'s weights to `path` in the official container (atomically)."""
        ...

    # Optional hooks (looked up with getattr; a family may leave them out):
    #   labels_from_seeds(bundle, seeds) -> int64 (B,)   the official sampler's own random class for each seed
    #   trainable_parameters(bundle) -> [(name, param)]  what self-training updates (default: all parameters)
    #   allows_null_class = True                         label num_classes means "no class" and may be asked
    #                                                    for (VAR: its classifier-free guidance row)
    #   build(device, seed, **sizes) -> Bundle          a fresh network at a chosen size (training from scratch,
    #                                                    as the Fashion-MNIST study does with EDM)


FAMILIES = Registry("neon.families", "family")


def register(name: str, factory: Callable[[], Family]) -> None:
    """Add a family at run time (tests use this for throw-away families)."""
    FAMILIES.register(name, factory)


def available() -> list[str]:
    return FAMILIES.names()


def get_family(name: str) -> Family:
    """Look a family up by name: run-time registrations first, then the `neon.families` entry points, then
    'package.module:Class' for families that are not installed."""
    if name not in FAMILIES and ":" in name:
        return load_attribute(name)()
    return FAMILIES.get(name)()
