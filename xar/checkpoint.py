"""xAR and KL-16 VAE checkpoint files: read every container the official code writes, load strictly, save.

Containers read (with neon's restricted unpickler, or torch.load(weights_only=True) for legacy non-zip files:
nothing in a file is executed):
- release xAR-B/L/H.pth: a plain state dict (official eval.py: model.load_state_dict(torch.load(path)));
- Neon's training snapshots and (possibly) its release files: {'model_ema': state_dict, 'epoch': int}
  (Neon xAR/util/misc.py save_model);
- upstream xAR training checkpoints (util/misc.py save_model): {'model', 'model_ema', 'optimizer', 'epoch',
  'args': argparse.Namespace}: the EMA weights are taken, as Neon's calculate_fid.py does
  (ckpt.get('model_ema', ckpt.get('state_dict', ckpt))); the Namespace is read as an inert record;
- kl16.ckpt: {'model': state_dict}.

Saved container: a plain state dict (`container='plain'`, the default). It is what the released xAR files are,
so the upstream eval.py and Neon's generate_dataset.py load it directly, and Neon's calculate_fid.py reads it
through its fallback `ckpt.get('model_ema', ckpt.get('state_dict', ckpt))`. `container='neon'` writes Neon's
training-snapshot layout {'model_ema': sd, 'epoch': n} instead (read by calculate_fid.py, not by eval.py).
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from neon.checkpoint import atomic_save, load_strict, read_pth, unwrap_state_dict
from neon.errors import NeonError
from xar import model as xar_model
from xar import vae as xar_vae

# Where xAR containers keep the network: Neon's calculate_fid order, then raw training weights.
XAR_KEYS = ("model_ema", "state_dict", "model")


def _read(path: str) -> Any:
    if not os.path.isfile(path):
        raise NeonError(f"{path}: checkpoint not found")
    if zipfile.is_zipfile(path):  # torch.save's format: the restricted unpickler (reads upstream's 'args' too)
        try:
            return read_pth(path)
        except RuntimeError as e:
            raise NeonError(f"{path}: not a readable torch checkpoint ({e})") from None
    try:  # a legacy (non-zip) torch.save file
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, truncated files, not a torch file at all
        raise NeonError(f"{path}: not a readable weights-only torch checkpoint ({type(e).__name__})") from None


def read_xar_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """-> (state dict, container) with container 'plain', 'model_ema', 'state_dict' or 'model'."""
    container, sd = unwrap_state_dict(_read(path), XAR_KEYS, f"{path} (xAR weights)", depth=1)
    return sd, container


def read_vae_state_dict(path: str) -> dict[str, torch.Tensor]:
    """kl16.ckpt: {'model': state_dict} (a plain state dict is accepted too)."""
    return unwrap_state_dict(_read(path), ("model",), f"{path} (KL-16 VAE)", depth=1)[1]


def _load_into(build, sd: Mapping[str, torch.Tensor], what: str, device) -> nn.Module:
    return load_strict(build, sd, what).float().to(device).eval()


def load_xar(path: str, device: torch.device | str = "cpu", model: str | None = None,
             **release_args) -> tuple[xar_model.XAR, str]:
    """Any xAR container -> (network in eval mode, container name).

    model: 'xar_base' / 'xar_large' / 'xar_huge' to insist on a release architecture; None reads it off the
    weights. release_args: constructor arguments the weights do not determine (attn_dropout, proj_dropout, ...).
    """
    sd, container = read_xar_state_dict(path)
    if model is not None:
        if model not in xar_model.CONFIGS:
            raise NeonError(f"unknown xAR model {model!r}; known: {', '.join(xar_model.CONFIGS)}")
        cfg = dataclasses.replace(xar_model.CONFIGS[model], **release_args)
        what = f"{path} does not match {model}"
    else:
        try:
            cfg = xar_model.config_from_state_dict(sd, **release_args)
        except (KeyError, IndexError, ZeroDivisionError):
            raise NeonError(f"{path}: not an xAR checkpoint (no class_emb / z_proj / blocks as in xAR)") from None
        what = f"{path} is not a consistent xAR checkpoint"
    try:
        cfg.check()
    except ValueError as e:
        raise NeonError(f"{path}: {e}") from None
    return _load_into(lambda: xar_model.XAR(cfg), sd, what, device), container


def load_vae(path: str, device: torch.device | str = "cpu") -> xar_vae.AutoencoderKL:
    """kl16.ckpt (or a smaller VAE of the same design) -> AutoencoderKL in eval mode, loaded strictly."""
    sd = read_vae_state_dict(path)
    try:
        cfg = xar_vae.config_from_state_dict(sd)
    except (KeyError, IndexError):
        raise NeonError(f"{path}: not a KL-VAE checkpoint (no encoder.conv_in / post_quant_conv)") from None
    return _load_into(lambda: xar_vae.AutoencoderKL(cfg), sd, f"{path} is not a consistent KL-VAE checkpoint", device)


def save_xar(state_dict: Mapping[str, torch.Tensor], path: str, container: str = "plain", epoch: int = 0) -> None:
    """Write an xAR state dict (buffers included) as a plain state dict or in Neon's {'model_ema', 'epoch'}."""
    sd = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
    if container == "plain":
        atomic_save(sd, path)
    elif container == "neon":
        atomic_save({"model_ema": sd, "epoch": int(epoch)}, path)
    else:
        raise NeonError(f"unknown xAR container {container!r}: 'plain' or 'neon'")
