"""The text-to-image study's configuration (`configs/fashion_mnist_text2image.yaml`): the Fashion-MNIST study's
`study:` schema (experiments/fashion_mnist/config.py, the same checks) with the network replaced by a Stable
Diffusion pipeline built from scratch, a VAE training stage before θr, and the prompt of each class."""
from __future__ import annotations

import dataclasses
from typing import Any

from experiments.fashion_mnist.config import StudyConfig
from experiments.fashion_mnist.config import parse_study as parse_image_study
from neon.config import ConfigError, load_yaml

KIND = "fashion_mnist_text2image"
# Fashion-MNIST's ten classes in caption words, in label order (datasets.CLASSES): prompt i asks for class i.
CLASS_WORDS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@dataclasses.dataclass
class PipelineModelConfig:
    """θr: UNet2DConditionModel + a frozen random CLIPTextModel + the VAE of the `vae` stage, in a
    StableDiffusionPipeline with DDIMScheduler (`Text2ImageFamily.build`, its BUILD_ARGS)."""
    conditional: bool = True             # always: label i is prompt i (the checks of the shared schema read it)
    model_channels: int = 32             # UNet: channels of the first level
    channel_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    num_blocks: int = 1                  # UNet: residual blocks per level
    cross_attention_levels: list[int] = dataclasses.field(default_factory=lambda: [1])   # 0 = the finest level
    vae_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])        # 2 levels: 16² -> 8² latents
    latent_channels: int = 4
    seed: int = 0                        # initialisation


@dataclasses.dataclass
class VAEConfig:
    """The VAE, trained first on the train split and then frozen (SD's order): MSE + kl_weight · KL per latent."""
    steps: int = 600
    batch: int = 128
    lr: float = 1.0e-3                   # AdamW, constant
    kl_weight: float = 1.0e-4            # small: the latents stay informative; the scale is fixed after training
    seed: int = 0


@dataclasses.dataclass
class PromptConfig:
    """The prompt set: prompt i = template with the i-th class's words."""
    template: str = "a photo of a {}"
    classes: list[str] = dataclasses.field(default_factory=lambda: list(CLASS_WORDS))

    def texts(self) -> list[str]:
        return [self.template.format(c) for c in self.classes]


@dataclasses.dataclass
class TextStudyConfig(StudyConfig):
    family: str = "text2image"
    model: PipelineModelConfig = dataclasses.field(default_factory=PipelineModelConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)


@dataclasses.dataclass
class StudyFile:
    study: TextStudyConfig
    kind: str = KIND
    description: str = ""
    smoke: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_study(data: Any, smoke: bool = False) -> StudyFile:
    doc = parse_image_study(data, smoke, StudyFile)   # the Fashion-MNIST study's checks, then the text ones
    cfg = doc.study
    if not cfg.model.conditional:
        raise ConfigError("study.model.conditional: a text-to-image model is conditioned on its prompts")
    if len(cfg.prompts.classes) != len(CLASS_WORDS) or "{}" not in cfg.prompts.template:
        raise ConfigError(f"study.prompts: one class word per Fashion-MNIST class ({len(CLASS_WORDS)}) and a "
                          "template with '{}'")
    if cfg.vae.steps <= 0 or cfg.vae.batch <= 0 or cfg.vae.lr <= 0 or cfg.vae.kl_weight < 0:
        raise ConfigError("study.vae: steps, batch and lr must be positive, kl_weight non-negative")
    return doc


def load_study(path: str, smoke: bool = False) -> StudyFile:
    return load_yaml(path, parse_study, smoke=smoke)
