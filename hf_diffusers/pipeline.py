"""Pipeline folders in and out: the denoising network, its VAE and its scheduler, built by the `diffusers` library
from their JSON configs, with weights read from safetensors only (never a pickle).

A folder is what `DiffusionPipeline.save_pretrained` writes: `model_index.json` (the pipeline's class and
components), `unet/` or `transformer/` (config.json + diffusion_pytorch_model.safetensors, or its shards),
`scheduler/scheduler_config.json`, and `vae/` for latent models. The network Neon merges is the EMA component where
the folder has one (see `neon.pipeline_folder`).
"""
from __future__ import annotations

import os
import re

import diffusers
import safetensors.torch
import torch

from hf_diffusers.config_bounds import build_scheduler, check_network, class_name
from neon.errors import NeonError
from neon.pipeline_folder import MODEL_INDEX, net_component, read_json, weight_files

# Network classes this family drives, by the `_class_name` their config.json records.
NET_CLASSES = {"UNet2DModel": diffusers.UNet2DModel, "DiTTransformer2DModel": diffusers.DiTTransformer2DModel}
# Older DiT folders (facebook/DiT-XL-2-256) record the generic class; diffusers itself remaps it by norm_type.
REMAPPED = {("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel"}
PIPELINES = ("DDPMPipeline", "DDIMPipeline", "DiTPipeline")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a Hub download fetches: configs and safetensors weights, never the pickled .bin copies beside them.
HUB_FILES = ["*.json", "*.safetensors", "*.txt"]


def resolve(path: str, local_files_only: bool | None = None) -> str:
    """A local pipeline folder for `path`: the folder itself, or the Hugging Face Hub snapshot of a repo id
    ('google/ddpm-cifar10-32'), downloaded when online and taken from the local cache when offline
    (local_files_only, default: $HF_HUB_OFFLINE)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.lexists(os.path.join(path, MODEL_INDEX)):
            raise NeonError(f"{path}: not a diffusers pipeline folder (no {MODEL_INDEX})")
        return path
    if os.path.exists(path) or not HUB_ID.match(path):
        raise NeonError(f"{path}: not a diffusers pipeline folder nor a Hub repo id")
    import huggingface_hub
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return huggingface_hub.snapshot_download(path, allow_patterns=HUB_FILES, local_files_only=local_files_only)
    except Exception as e:  # offline without a cached copy, unknown repo, network error
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NeonError(f"{path}: no such local folder, and cannot get this Hub pipeline ({why}); download it "
                        "with download_models.sh or `hf download`, and pass the folder") from None


def pipeline_class(folder: str) -> str | None:
    """The `_class_name` of `folder`/model_index.json; None when it cannot be read as one."""
    try:
        name = read_json(os.path.join(folder, MODEL_INDEX)).get("_class_name")
    except NeonError:
        return None
    return name if isinstance(name, str) else None


def load_module(component: str, classes: dict, device) -> torch.nn.Module:
    """The model in `component/` (config.json + safetensors), built by diffusers, in eval mode, frozen; built only
    once its config is known to describe the network its weights hold (`config_bounds.check_network`)."""
    config_path = os.path.join(component, "config.json")
    config = read_json(config_path)
    name = class_name(config_path, config)
    norm = config.get("norm_type")
    name = REMAPPED.get((name, norm if isinstance(norm, str) else None), name)
    if name not in classes:
        raise NeonError(f"{config_path}: class {name!r} is not supported here (known: {', '.join(sorted(classes))})")
    files = weight_files(component)
    check_network(config_path, classes[name], config, files)
    model = classes[name].from_config(config)
    state = {}
    for file in files:
        state.update(safetensors.torch.load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NeonError(f"{component}: weights do not match {name} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model.to(device).eval().requires_grad_(False)


def load_scheduler(folder: str, pipeline: str):
    """The pipeline's scheduler from its config; DDIMPipeline turns any scheduler into DDIM, as its __init__."""
    config_path = next((p for p in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                                    os.path.join(folder, "scheduler_config.json")) if os.path.lexists(p)), None)
    if config_path is None:
        raise NeonError(f"{folder}: no scheduler/scheduler_config.json")
    config = read_json(config_path)
    name = class_name(config_path, config)
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise NeonError(f"{config_path}: unknown scheduler {name!r}")
    scheduler = build_scheduler(config_path, cls, config)
    if pipeline == "DDIMPipeline":
        scheduler = build_scheduler(config_path, diffusers.DDIMScheduler, dict(scheduler.config))
    return scheduler


def load_pipeline(folder: str, device) -> dict:
    """{'pipeline', 'component', 'net', 'scheduler', 'vae' (latent models, else None)} of a local folder."""
    index = read_json(os.path.join(folder, MODEL_INDEX))
    pipeline = class_name(os.path.join(folder, MODEL_INDEX), index)
    if pipeline not in PIPELINES:
        raise NeonError(f"{folder}/{MODEL_INDEX}: pipeline {pipeline!r} is not supported (known: "
                        f"{', '.join(PIPELINES)})")
    component, net_dir = net_component(folder)
    net = load_module(net_dir, NET_CLASSES, device)
    vae = None
    if isinstance(net, diffusers.DiTTransformer2DModel):
        if not os.path.isdir(os.path.join(folder, "vae")):
            raise NeonError(f"{folder}: a DiT pipeline needs its vae/ component")
        vae = load_module(os.path.join(folder, "vae"), {"AutoencoderKL": diffusers.AutoencoderKL}, device)
    return dict(pipeline=pipeline, component=component, net=net, scheduler=load_scheduler(folder, pipeline),
                vae=vae)


def pipeline_object(pipeline: str, net, scheduler, vae=None):
    """The diffusers pipeline itself (for `save_pretrained` of a network that has no folder yet)."""
    cls = getattr(diffusers, pipeline)
    if pipeline == "DiTPipeline":
        return cls(transformer=net, vae=vae, scheduler=scheduler)
    return cls(unet=net, scheduler=scheduler)
