"""θneon as a LoRA file, in the two layouts text-to-image users load (factors from neon.lora):

- diffusers / PEFT: `pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight` (down, (r, in)) and
  `.lora_B.weight` (up, (out, r)), the adapter's configuration in the `lora_adapter_metadata` header entry
  (prefixed with the component, as diffusers' `save_lora_weights` writes it). `pipe.load_lora_weights(folder)`
  then `pipe.fuse_lora()` gives θneon; `pipe.set_adapters([name], adapter_weights=[s])` dials its strength.
- kohya / Automatic1111 / ComfyUI: keys `lora_unet_<module with '_' for '.'>.lora_down.weight`, `.lora_up.weight`
  and `.alpha` (here the rank: scale 1), which diffusers' own loader converts too.

Every LoRA written here has scale 1 (alpha = rank): the merge's coefficients are in the up factors.
"""
from __future__ import annotations

import collections
import json
import os

import torch

from neon.checkpoint import atomic_path
from neon.errors import NeonError
from neon.lora import Lora

PEFT_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "neon_lora_kohya.safetensors"


def _scaled(lora: Lora) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with the scale folded into up, contiguous: the factors of a scale-1 LoRA."""
    return lora.down.contiguous(), (lora.scale * lora.up).contiguous()


def peft_metadata(loras: dict[str, Lora], component: str) -> dict:
    """The adapter configuration diffusers reads back (LoraConfig fields, prefixed with `component`): the most
    common rank as `r` and `lora_alpha` (scale 1), other ranks in rank_pattern / alpha_pattern."""
    ranks = {name: lora.rank for name, lora in loras.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(loras), "lora_dropout": 0.0, "bias": "none", "use_dora": False,
              "init_lora_weights": True}
    return {f"{component}.{k}": v for k, v in config.items()}


def save_peft(loras: dict[str, Lora], folder: str, component: str = "unet") -> str:
    """Write `folder`/pytorch_lora_weights.safetensors (atomically) -> its path."""
    from safetensors.torch import save_file
    tensors = {}
    for name, lora in loras.items():
        down, up = _scaled(lora)
        tensors[f"{component}.{name}.lora_A.weight"] = down
        tensors[f"{component}.{name}.lora_B.weight"] = up
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PEFT_FILE)
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(peft_metadata(loras, component), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def kohya_name(module: str, component: str = "unet") -> str:
    return f"lora_{component}_{module.replace('.', '_')}"


def save_kohya(loras: dict[str, Lora], path: str, component: str = "unet") -> str:
    """Write a kohya-layout .safetensors at `path` (atomically): lora_down, lora_up and alpha = rank."""
    from safetensors.torch import save_file
    tensors = {}
    for name, lora in loras.items():
        down, up = _scaled(lora)
        key = kohya_name(name, component)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(lora.rank))
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return path


def read_peft(path: str, component: str = "unet") -> dict[str, Lora]:
    """The `component`'s adapters of a diffusers/PEFT LoRA file (scale from its lora_adapter_metadata; 1 when the
    file records none), read as plain tensors."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw) if raw else {}
    prefix, loras = f"{component}.", {}
    for key in tensors:
        if key.startswith(prefix) and key.endswith(".lora_A.weight"):
            name = key[len(prefix):-len(".lora_A.weight")]
            up = tensors.get(f"{prefix}{name}.lora_B.weight")
            if up is None:
                raise NeonError(f"{path}: {key} has no lora_B factor")
            rank = tensors[key].shape[0]
            r = meta.get(f"{component}.rank_pattern", {}).get(name, meta.get(f"{component}.r", rank))
            alpha = meta.get(f"{component}.alpha_pattern", {}).get(name, meta.get(f"{component}.lora_alpha", r))
            loras[name] = Lora(tensors[key], up, float(alpha) / float(r))
    if not loras:
        raise NeonError(f"{path}: no {component} LoRA factors (keys '{component}.<module>.lora_A.weight')")
    return loras


def save_layouts(loras: dict[str, Lora], folder: str, component: str) -> None:
    """θneon's adapter in both layouts, into `folder`: pytorch_lora_weights.safetensors (diffusers / PEFT) and
    neon_lora_kohya.safetensors (kohya / Automatic1111 / ComfyUI)."""
    save_peft(loras, folder, component)
    save_kohya(loras, os.path.join(folder, KOHYA_FILE), component)
