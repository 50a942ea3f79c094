"""The study's configuration (`configs/fashion_mnist_16.yaml`): a top-level `study:` section, validated on load.

Same rules as run configs (neon/config.py): unknown keys, missing keys and wrong types are refused with a
one-line error naming the field; the `smoke:` section holds overrides that `neon run --smoke` merges on top.
The two training stages reuse the core's `FinetuneConfig`: the base model is trained from scratch by the same
loop that self-trains it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from experiments.fashion_mnist.datasets import CLASSES
from neon.config import ConfigError, FinetuneConfig, apply_smoke, build_config, load_yaml

KIND = "fashion_mnist"
ARMS = ("ode", "control", "diverse")   # θs from S (ODE sampler), from real images, from S (diversity-seeking)
GUIDE_ARM = "ode"                      # the self-trained θs that guides θr (and θneon) at sampling time


@dataclasses.dataclass
class ModelConfig:
    """θr: EDMPrecond + SongUNet (DDPM++) at 16×16 with one image channel, built by `family.build`."""
    conditional: bool = True             # 10 Fashion-MNIST classes; False = unconditional
    model_channels: int = 16             # SongUNet base channel count
    channel_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2])   # per resolution level
    num_blocks: int = 1                  # residual blocks per level
    attn_resolutions: list[int] = dataclasses.field(default_factory=list)
    dropout: float = 0.0
    seed: int = 0                        # initialisation


@dataclasses.dataclass
class ClassifierConfig:
    """The small CNN whose penultimate features define "classifier FD" (trained on the train split)."""
    width: int = 16                      # channels of the first convolution; features have 4·width dimensions
    epochs: int = 2
    batch: int = 256
    lr: float = 2.0e-3                   # Adam, decayed linearly to 0
    max_images: int | None = None        # train on the first N training images only (smoke runs)
    seed: int = 0


@dataclasses.dataclass
class SyntheticConfig:
    """S: images drawn from θr, one set per sampler, on the same seeds and balanced labels."""
    num_images: int = 2000
    seed_offset: int = 1_000_000         # far from the evaluation seeds
    batch: int = 250
    sampler: dict[str, Any] = dataclasses.field(default_factory=lambda: {"num_steps": 18})   # mode-seeking (ODE)
    diverse_sampler: dict[str, Any] = dataclasses.field(default_factory=dict)              # diversity-seeking


@dataclasses.dataclass
class ControlConfig:
    """The control arm: the same fine-tuning on real training images instead of S."""
    num_images: int = 2000               # drawn from the train split without replacement
    seed: int = 0


@dataclasses.dataclass
class SweepConfig:
    """The grids, each searched on the validation range. Merge weights w per arm; w = 0 (θr itself) is always a
    candidate, evaluated once and shared. `guided`: guide scales ω for θr sampled with the ODE arm's θs as guide
    (ω = 0 is θr); `neon_guided`: ω for θneon at the ODE arm's chosen w, with the same guide (ω = 0 is θneon)."""
    ode: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0])
    control: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0])
    diverse: list[float] = dataclasses.field(default_factory=lambda: [-1.0, -0.5, 0.5, 1.0])
    guided: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.0, 2.0])
    neon_guided: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 1.0])


@dataclasses.dataclass
class EvaluationConfig:
    """Paired evaluation: every model samples the same seeds and labels. One validation range chooses every w and
    ω; `repeats` report ranges, disjoint from it and from each other, give the chosen points' mean ± std."""
    per_class: int = 30                  # images of each class per seed range (N = 10·per_class)
    num_images: int | None = None        # N for an unconditional model
    repeats: int = 3                     # report range b uses seeds offset + b·N … offset + (b+1)·N − 1
    seed_offset: int = 0
    validation_offset: int | None = None   # first seed of the validation range; None = right after the report ranges
    batch: int = 300
    sampler: dict[str, Any] = dataclasses.field(default_factory=lambda: {"num_steps": 18})


@dataclasses.dataclass
class StudyConfig:
    family: str = "edm"
    data_root: str | None = None         # None = /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist)
    threads: int | None = 1              # torch CPU threads (None = leave torch's choice)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    base: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)       # training θr from scratch
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    selftrain: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)  # the same for every arm
    control: ControlConfig = dataclasses.field(default_factory=ControlConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    required_ratio: float = 3.0          # success criterion: the chosen w's improvement ≥ this × its std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StudyFile:
    study: StudyConfig
    kind: str = KIND                     # the `neon run` config kind this experiment registers
    description: str = ""
    smoke: dict[str, Any] = dataclasses.field(default_factory=dict)


def _checks(cfg: StudyConfig) -> None:
    e = cfg.evaluation
    if e.repeats < 2:
        raise ConfigError(f"study.evaluation.repeats: at least 2 report ranges are needed for a std, got {e.repeats}")
    if cfg.model.conditional and (e.per_class is None or e.per_class <= 0):
        raise ConfigError("study.evaluation.per_class: a conditional model needs a positive per_class")
    if not cfg.model.conditional and (e.num_images is None or e.num_images < 2):
        raise ConfigError("study.evaluation.num_images: an unconditional model needs num_images >= 2")
    if e.validation_offset is not None:
        n = range_size(cfg)
        report = range(e.seed_offset, e.seed_offset + e.repeats * n)
        if e.validation_offset < report.stop and e.validation_offset + n > report.start:
            raise ConfigError(f"study.evaluation.validation_offset: seeds {e.validation_offset}…"
                              f"{e.validation_offset + n - 1} overlap the report ranges "
                              f"{report.start}…{report.stop - 1}")
    for name in ("guided", "neon_guided"):
        if not getattr(cfg.sweep, name):
            raise ConfigError(f"study.sweep.{name}: at least one guide scale is needed")
    for name, value in (("synthetic.num_images", cfg.synthetic.num_images), ("control.num_images",
                        cfg.control.num_images), ("classifier.epochs", cfg.classifier.epochs),
                        ("classifier.batch", cfg.classifier.batch), ("synthetic.batch", cfg.synthetic.batch),
                        ("evaluation.batch", e.batch), ("base.batch", cfg.base.batch),
                        ("selftrain.batch", cfg.selftrain.batch)):
        if value <= 0:
            raise ConfigError(f"study.{name}: must be positive, got {value}")
    if cfg.threads is not None and cfg.threads <= 0:
        raise ConfigError(f"study.threads: must be positive, got {cfg.threads}")
    for section in ("base", "selftrain"):
        t = getattr(cfg, section)
        if t.lr <= 0:
            raise ConfigError(f"study.{section}.lr: must be positive, got {t.lr}")
        if t.ema is not None and set(t.ema) - {"beta", "halflife_images"}:
            raise ConfigError(f"study.{section}.ema: expected 'beta' or 'halflife_images', got {sorted(t.ema)}")


def range_size(cfg: StudyConfig, num_classes: int = len(CLASSES)) -> int:
    """N, the images of one seed range: per_class · classes (conditional) or num_images."""
    e = cfg.evaluation
    return e.per_class * num_classes if cfg.model.conditional else e.num_images


def parse_study(data: Any, smoke: bool = False, file_class: type = StudyFile):
    """The study file `data` (its smoke section applied with `smoke`) as `file_class`, its study checked; a study
    that extends this one's (experiments/fashion_t2i) passes its own file class and adds its checks."""
    if not isinstance(data, dict) or "study" not in data:
        raise ConfigError("study: a study config needs a top-level 'study:' section")
    if smoke:
        data = apply_smoke(data)
    doc = build_config(file_class, data, "")
    _checks(doc.study)
    return doc


def load_study(path: str, smoke: bool = False) -> StudyFile:
    return load_yaml(path, parse_study, smoke=smoke)
