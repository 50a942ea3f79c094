"""The adapter protocol: what a model family tells the Neon core, and the registry that finds families by name.

A family (edm, var, xar, imm, or a test family) subclasses `Family` and declares the arguments it accepts.
Everything else — sharding seeds across ranks, caching encoded examples, DDP, EMA, merging, metrics, sweeps —
belongs to the core. The core never imports a family package: families are found through the `neon.families`
entry-point group (pyproject.toml) or registered at run time with `register()`.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from neon.errors import NeonError
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
    guide:       θs as a sampling-time guide, or None: `net`'s architecture with other weights (a self-training
                 snapshot), in eval mode. A sampler given `guide_scale` ω ≠ 0 evaluates both networks and uses
                 (1+ω)·out_net − ω·out_guide at every network evaluation; with ω = 0 it never runs the guide.
                 Never trained, never merged, never saved (`neon.guidance.with_guide` sets it).
    lora:        θr's own low-rank adapters (module name -> neon.lora.Lora) when θr is a base network with a
                 user's LoRA: `net` holds the base weights with them fused, and LoRA self-training continues them.
    """
    net: torch.nn.Module
    helpers: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)
    num_classes: int = 0
    resolution: int = 0
    channels: int = 3
    source: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    guide: torch.nn.Module | None = None
    lora: dict[str, Any] | None = None

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to(self, device) -> Bundle:
        self.net.to(device)
        if self.guide is not None:
            self.guide.to(device)
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
    # fp16's GradScaler (torch's defaults unless the official recipe sets its own)
    scaler_init_scale: float = 2.0 ** 16
    scaler_growth_interval: int = 2000
    scaler_max_scale: float | None = None    # a scale above this after a step is set back to it; None: no cap


@dataclasses.dataclass(frozen=True)
class Arg:
    """One keyword argument a family accepts: the config and the CLI check names and types against these."""
    name: str
    type: Any          # an annotation neon.config checks values against: int, float, str, bool, list[int], X | None
    default: Any       # what the family uses when the argument is not given (None: the family's own rule)
    help: str          # one line of meaning, in the paper's or the official script's terms


def arg_names(args: Sequence[Arg]) -> list[str]:
    return [a.name for a in args]


class Family:
    """The five things a family tells the core (`load`, `sample`, `encode`, `loss`, `save`), a tiny network for
    smoke runs and tests, and the keyword arguments each of them accepts. A family subclasses this and
    overrides the five methods and `tiny`; the optional hooks below have defaults.

    The declared arguments (tuples of `Arg`) are the only keywords the core passes on: the config
    (`neon.config`) and the CLI (`--arg`, `--load-arg`, `--loss-arg`) refuse any other name, so an adapter
    never checks for typos itself.
    """

    name: str = ""
    train_defaults: TrainDefaults = TrainDefaults()
    # `sample`'s keyword `batch_invariant` is the core's (neon.sampling.draw_batch), never a config's: it is not
    # declared among SAMPLER_ARGS.
    SAMPLER_ARGS: tuple[Arg, ...] = ()   # keywords of `sample` (a config's synthetic/sweep/final `sampler`)
    LOSS_ARGS: tuple[Arg, ...] = ()      # keywords of `loss` (a config's `finetune.loss_args`)
    LOAD_ARGS: tuple[Arg, ...] = ()      # keywords of `load` (a config's `load_args`: VAE paths, ...)
    TINY_ARGS: tuple[Arg, ...] = ()      # keywords of `tiny` besides LOAD_ARGS (a smoke run's `load_args`)
    BUILD_ARGS: tuple[Arg, ...] = ()     # keywords of `build` (network sizes)
    # The kinds of file `load` reads (neon.containers: PICKLE, TORCH_ZIP, ...): the core refuses a checkpoint of
    # another kind before `load` opens it, naming what the file is. Empty: any file goes to `load`.
    CONTAINERS: tuple[str, ...] = ()
    # CUDA's TF32 and cuDNN settings (neon.fastpaths.Backends) for "sample" and "train", as the official code
    # sets them for each; a stage with none leaves PyTorch's settings as they are.
    BACKENDS: dict[str, Any] = {}
    # `save` writes a folder (a diffusers pipeline): θneon and snapshots are then named without a file extension.
    SAVES_FOLDERS: bool = False
    # The family's released checkpoint files (as download_models.sh names them) -> `tiny` arguments of a network
    # of the same kind: tests write these stand-ins (and `save_helpers`) to run the README's commands offline.
    RELEASES: dict[str, dict[str, Any]] = {}

    def load(self, path: str, device: torch.device | str = "cpu", **load_args) -> Bundle:
        """Official checkpoint file (or one this project saved) -> networks in eval mode on `device`."""
        raise NotImplementedError

    def tiny(self, device: torch.device | str = "cpu", seed: int = 0, **tiny_args) -> Bundle:
        """A randomly initialised network of a few thousand to a few hundred thousand parameters, with the
        same code paths as the released models; used by `neon run --smoke` and by tests. It accepts LOAD_ARGS
        too (a smoke run passes the config's load_args) and ignores those that name files."""
        raise NotImplementedError

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
        raise NotImplementedError

    def encode(self, bundle: Bundle, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Synthetic images uint8 (B, H, W, C) + labels -> training examples: a dict of tensors whose first
        dimension is B (VAE latents, VQ token indices, or the images in the network's range). The core calls
        this once per image and caches the result."""
        raise NotImplementedError

    def loss(self, bundle: Bundle, batch: dict[str, torch.Tensor], **loss_args) -> torch.Tensor:
        """The family's own training loss (a scalar, mean over the batch) on a batch of `encode`'s output,
        computed with `bundle.net` in train mode. Random draws use the global torch RNG, as the official code."""
        raise NotImplementedError

    def save(self, bundle: Bundle, path: str) -> None:
        """Write `bundle.net`'s weights to `path` in the official container (atomically)."""
        raise NotImplementedError

    # -- optional hooks ------------------------------------------------------------------------------------
    def labels_from_seeds(self, bundle: Bundle, seeds: Sequence[int]) -> torch.Tensor | None:
        """The official sampler's own random class for each seed, int64 (B,); None: the family has no rule of
        its own and the core draws the labels from the seeds."""
        return None

    def trainable_parameters(self, bundle: Bundle) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) pairs self-training updates: all of them, as the official fine-tuning runs do."""
        return list(bundle.net.named_parameters())

    # allows_null_class = True: label num_classes means "no class" and may be asked for (VAR: its
    # classifier-free guidance row); a class attribute, read by neon.sampling.allows_null_class.
    allows_null_class: bool = False

    def build(self, device: torch.device | str = "cpu", seed: int = 0, **build_args) -> Bundle:
        """A fresh network at a chosen size, to train from scratch (as the Fashion-MNIST study does with EDM)."""
        raise NeonError(f"{self.name}: this family cannot build a network from scratch (no `build`)")

    @classmethod
    def can_build(cls) -> bool:
        return cls.build is not Family.build

    def resolve_remote(self, name: str, load_args: dict[str, Any]) -> str | None:
        """A config's `base` that is no local file or folder: None when `name` is not a remote name this family
        can fetch (the default: a family reads local files only), else the local path `load` reads for it,
        fetched or found in a local cache now (a NeonError of one line when neither works). load_args: the
        config's `load_args` (e.g. a family's offline switch)."""
        return None

    def label_texts(self, bundle: Bundle) -> list[str] | None:
        """The text each label stands for (a text-to-image model's prompts), for prompt-adherence metrics such
        as the CLIP score; None: the labels are classes without a text."""
        return None

    def save_lora(self, bundle: Bundle, loras: dict, folder: str) -> None:
        """Write θneon as a LoRA (module name -> neon.lora.Lora, scale 1) into `folder`, in the layouts this family's
        users load. Default: the core's own file, neon_lora.safetensors (`neon.lora_train.save_factors`)."""
        from neon.lora_train import save_factors
        save_factors(loras, os.path.join(folder, "neon_lora.safetensors"))

    def reads(self, path: str) -> bool:
        """Whether `load` takes `path`, a file or folder of a kind in CONTAINERS: False for one the family can tell
        belongs to another (a pipeline folder of a class it does not drive). Default: every one."""
        return True

    def save_helpers(self, bundle: Bundle, folder: str) -> None:
        """Write the frozen helpers (VAE, tokenizer) of `bundle` into `folder` under their released file names,
        where `load` finds them; a family without helper files writes nothing."""


FAMILIES = Registry("neon.families", "family")


def register(name: str, factory: Callable[[], Family]) -> None:
    """Add a family at run time (tests use this for throw-away families)."""
    FAMILIES.register(name, factory)


def available() -> list[str]:
    return FAMILIES.names()


# Families this module provides are for tests and smoke runs of the core: not listed to users.
TEST_MODULE = "neon.testing"


def public() -> list[str]:
    """The installed families a user chooses from (`--family` help): all but the core's test families."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=FAMILIES.group)
                  if ep.value.partition(":")[0] != TEST_MODULE)


def readers(kind: str, path: str | None = None) -> list[str]:
    """The public families whose `load` reads files of `kind` (and takes `path`, when given: `Family.reads`).
    Imports every family: for error messages and for telling the family of a file."""
    found = []
    for name in public():
        try:
            cls = FAMILIES.get(name)
            if kind in getattr(cls, "CONTAINERS", ()) and (path is None or cls().reads(path)):
                found.append(name)
        except Exception:   # a family whose package cannot be imported here reads nothing here
            continue
    return found


def get_family(name: str) -> Family:
    """Look a family up by name: run-time registrations first, then the `neon.families` entry points, then
    'package.module:Class' for families that are not installed."""
    if name not in FAMILIES and ":" in name:
        return load_attribute(name)()
    return FAMILIES.get(name)()
