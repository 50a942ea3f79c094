"""Text-to-image pipeline folders in and out: every component `model_index.json` lists, built by its own library
(diffusers networks and schedulers, transformers text encoders and tokenizers) from its config, weights read from
safetensors only.

A pipeline is data here: `SPECS` says, per pipeline class, which component is the denoising network (the one
Neon trains and merges), which are frozen text encoders, and which keywords carry the prompt embeddings from its
`encode_prompt` to its `__call__`. A PixArt- or Sana-like pipeline is one more entry, with its classes in the
allow-lists below.
"""
from __future__ import annotations

import dataclasses
import inspect
import os

import diffusers
import torch
import transformers

from hf_diffusers.config_bounds import check_numbers, class_name
from hf_diffusers.pipeline import load_module, load_scheduler
from neon.errors import NeonError
from neon.pipeline_folder import MODEL_INDEX, read_json


@dataclasses.dataclass(frozen=True)
class Spec:
    net: str                     # the component Neon trains and merges
    embeds: tuple[str, ...]      # encode_prompt's outputs, in order, as __call__'s keywords
    fixed: dict = dataclasses.field(default_factory=dict)   # constructor keywords not stored in the folder


SPECS = {
    "StableDiffusionPipeline": Spec(
        "unet", ("prompt_embeds", "negative_prompt_embeds"),
        dict(safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)),
    "StableDiffusionXLPipeline": Spec(
        "unet", ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        dict(image_encoder=None, feature_extractor=None, add_watermarker=False)),
    "StableDiffusion3Pipeline": Spec(
        "transformer",
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        dict(image_encoder=None, feature_extractor=None)),
}
# The classes a folder may name, by library: nothing else is built.
NETWORKS = {name: getattr(diffusers, name) for name in
            ("UNet2DConditionModel", "SD3Transformer2DModel", "AutoencoderKL")}
TEXT_ENCODERS = {name: getattr(transformers, name) for name in
                 ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")}
TOKENIZERS = {name: getattr(transformers, name) for name in ("CLIPTokenizer", "T5TokenizerFast")}
ABSENT = {"safety_checker", "feature_extractor", "image_encoder"}   # never loaded: not part of sampling


def components(folder: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """(pipeline class, {component: (library, class)}) from `folder`/model_index.json; null entries left out."""
    path = os.path.join(folder, MODEL_INDEX)
    index = read_json(path)
    pipeline = class_name(path, index)
    if pipeline not in SPECS:
        raise NeonError(f"{path}: pipeline {pipeline!r} is not a text-to-image pipeline supported here "
                        f"(known: {', '.join(SPECS)})")
    parts = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[:1] == [None] or name in ABSENT:
            continue
        if len(entry) != 2 or not all(isinstance(e, str) for e in entry):
            raise NeonError(f"{path}: {name} must be [library, class], got {entry!r}")
        if os.path.basename(name) != name or name in (".", ".."):
            raise NeonError(f"{path}: bad component name {name!r}")
        parts[name] = (entry[0], entry[1])
    if SPECS[pipeline].net not in parts:
        raise NeonError(f"{path}: no {SPECS[pipeline].net} component")
    return pipeline, parts


def load_text_encoder(folder: str, cls_name: str, device) -> torch.nn.Module:
    """A frozen transformers text encoder from `folder` (config.json + model.safetensors or its shards): its
    config's numbers bounded before anything is built, every weight present (no random fill), in eval mode."""
    if cls_name not in TEXT_ENCODERS:
        raise NeonError(f"{folder}: text encoder class {cls_name!r} is not supported (known: "
                        f"{', '.join(TEXT_ENCODERS)})")
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path)
    for part in (config, config.get("text_config") or {}):
        check_numbers(config_path, {k: v for k, v in part.items() if not isinstance(v, dict)})
    transformers.utils.logging.disable_progress_bar()   # a bar per encoder would drown the run's own
    try:
        model, info = TEXT_ENCODERS[cls_name].from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                              output_loading_info=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NeonError(f"{folder}: cannot load {cls_name} from safetensors ({why})") from None
    finally:
        transformers.utils.logging.enable_progress_bar()
    bad = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if bad:
        raise NeonError(f"{folder}: weights do not match {cls_name} ({bad[0].replace('_', ' ')}: "
                        f"{sorted(map(str, info[bad[0]]))[:3]})")
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(folder: str, cls_name: str):
    if cls_name not in TOKENIZERS:
        raise NeonError(f"{folder}: tokenizer class {cls_name!r} is not supported (known: {', '.join(TOKENIZERS)})")
    try:
        return TOKENIZERS[cls_name].from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NeonError(f"{folder}: cannot read the {cls_name} files ({why})") from None


def load_pipeline(folder: str, device) -> tuple[str, dict]:
    """(pipeline class, {component: built object}) of a local text-to-image folder."""
    pipeline, parts = components(folder)
    built = {}
    for name, (library, cls_name) in parts.items():
        sub = os.path.join(folder, name)
        if name == "scheduler":
            built[name] = load_scheduler(folder, pipeline)
        elif cls_name in NETWORKS:
            built[name] = load_module(sub, {cls_name: NETWORKS[cls_name]}, device)
        elif cls_name in TEXT_ENCODERS:
            built[name] = load_text_encoder(sub, cls_name, device)
        elif cls_name in TOKENIZERS:
            built[name] = load_tokenizer(sub, cls_name)
        else:
            raise NeonError(f"{folder}/{MODEL_INDEX}: component {name} of class {library}.{cls_name} is not "
                            "supported here")
    return pipeline, built


def pipeline_object(pipeline: str, parts: dict, net: torch.nn.Module):
    """The diffusers pipeline over `parts` with `net` as its denoising network (the weights being scored)."""
    spec, cls = SPECS[pipeline], getattr(diffusers, pipeline)
    needed = [p.name for p in inspect.signature(cls.__init__).parameters.values()
              if p.default is inspect.Parameter.empty and p.name != "self"]
    pipe = cls(**{**dict.fromkeys(needed), **parts, spec.net: net, **spec.fixed})   # null components as None
    pipe.set_progress_bar_config(disable=True)
    return pipe
