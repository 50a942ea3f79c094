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
from neon import paths
from neon.checkpoint import check_state_dict
from neon.errors import NeonError, one_line
from neon.pipeline_folder import MODEL_INDEX, read_json
from neon.transformers_folder import read_safetensors, weight_files


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
MAX_TOKENIZER_BYTES = 64 << 20   # CLIP's vocab.json is 1.6 MB, T5's tokenizer.json 2.4 MB


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
    check_headers(folder, TEXT_ENCODERS[cls_name], config)
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


def check_headers(folder: str, cls, config: dict) -> None:
    """Refuse a config whose model (built on the meta device: no memory) is not the one the safetensors headers
    hold — each stored tensor a tensor of the model, of its shape, and every tensor of the model stored (but the
    ones it ties to another) — before anything is allocated: what is then built is what the files hold."""
    config_path = os.path.join(folder, "config.json")
    try:
        with torch.device("meta"):
            model = cls(cls.config_class.from_dict(config))
    except Exception as e:   # transformers' own refusals, and what a bad value breaks
        raise NeonError(one_line(f"{config_path}: transformers cannot build {cls.__name__} from it "
                                 f"({type(e).__name__}: {e})")) from None
    expected = model.state_dict()
    stored = {k: v for path in weight_files(folder) for k, v in read_safetensors(path, data=False).items()}
    tied = getattr(model, "_tied_weights_keys", None) or ()
    check_state_dict({k: v for k, v in expected.items() if k in stored or k not in tied},
                     {k: v for k, v in stored.items() if k in expected or not k.endswith(".position_ids")},
                     f"{folder}: the {cls.__name__} of its config.json is not the one its weights hold")


def load_tokenizer(folder: str, cls_name: str):
    """The tokenizer in `folder`: its files regular files of at most MAX_TOKENIZER_BYTES each (released ones are
    a few MB), read by transformers as the JSON and text they are."""
    if cls_name not in TOKENIZERS:
        raise NeonError(f"{folder}: tokenizer class {cls_name!r} is not supported (known: {', '.join(TOKENIZERS)})")
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = paths.input_file(os.path.join(folder, entry), "tokenizer file")
        if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
            raise NeonError(f"{path}: {os.path.getsize(path)} bytes, more than a tokenizer file holds (at most "
                            f"{MAX_TOKENIZER_BYTES})")
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
