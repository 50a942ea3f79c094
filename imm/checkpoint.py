"""IMM checkpoints: the released pickles (read safely), Neon copies of them, and our own container.

- Released files (`imagenet256_ts_a2.pkl`, `imagenet256_s_a1.pkl`, `Neon_imm_imagenet256.pkl`) are pickles of
  `torch_utils.persistence` objects; the official loaders use `data['ema']`. We read them with
  `neon.safe_pickle` (nothing from the file runs), build an `IMMPrecond` from the recorded `_init_kwargs` and
  load the `ema` weights strictly.
- A network loaded from such a file is saved with `neon.checkpoint.write_like`: a byte-for-byte copy of the
  template with the tensors replaced, which the official code loads exactly like the template.
- A network with no template (the tiny one) goes into our own torch.save container, readable with
  `torch.load(weights_only=True)`: {'ema': state_dict, 'init_kwargs': ..., 'class_name': 'IMMPrecond',
  'neon_family': 'imm'}.
"""
from __future__ import annotations

import os

import torch

from imm.precond import IMMPrecond
from neon import checkpoint as neon_checkpoint
from neon import safe_pickle
from neon.errors import NeonError

# Normalised SHA-256 (neon.safe_pickle.source_sha256) of the files whose classes IMM pickles carry as
# `module_src`: lumalabs/imm training/preconds.py (IMMPrecond), training/dit.py (DiT and its blocks),
# training/encoders.py and training/unets.py, unchanged since their first commit (0ab7362) through c9473e9; and
# the Neon repository's imm/training/ (SinaAlemohammad/Neon @76496c3), whose preconds.py appends its training
# methods (a different file) and whose dit.py / encoders.py / unets.py equal lumalabs/imm's. Obtained by hashing
# `git show <commit>:<path>` over each repository's history; the released pickles embed their class's module
# text (inspect.getsource). A fork with other code is refused.
OFFICIAL_SOURCES = {
    "e1c9fc979962cb77e3ae9472b00b4ca9d940da1f1483e446bce88397fbb34e4b":
        "lumalabs/imm@0ab7362..c9473e9 training/preconds.py",
    "52efdb9d82f7b8f3819d02252344ede29a512d30c549589f93472136b6dd9923":
        "SinaAlemohammad/Neon@76496c3 imm/training/preconds.py",
    "9b28e657e11e4d3367ba00a00461f3badd7fc116426808c03d472692de7c2fc7": "lumalabs/imm@0ab7362..c9473e9 training/dit.py",
    "198d21859c0972c58ded20473e9245367cbe24a77bff164f9f5c5295e287e4b3":
        "lumalabs/imm@0ab7362..c9473e9 training/encoders.py",
    "798655ff3321de6eac0c4977103f0398c4a6fa974a38217a6b9e5eb06e0cde3d":
        "lumalabs/imm@0ab7362..c9473e9 training/unets.py",
}

# IMMPrecond's positional arguments, for a persistence record that kept some in `_init_args`.
_POSITIONAL = ("img_resolution", "img_channels", "label_dim")


def read_checkpoint(path: str, trust_architecture: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(constructor kwargs, ema state dict) of an IMM pickle or of our own container. A pickle whose embedded
    source is not an official release's is refused unless trust_architecture (see OFFICIAL_SOURCES)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NeonError(f"{path}: checkpoint not found")
    fmt = neon_checkpoint.detect_format(path)
    if fmt == "pickle":
        # Lazy parse (storages located, not read), then one tensor at a time: a DiT-XL/2 file is 2.7 GB.
        records: list[safe_pickle.Record] = []
        data = safe_pickle.load(path, lazy=True, records=records)
        safe_pickle.check_sources(records, OFFICIAL_SOURCES, path, trust_architecture)
        ema = data.get("ema") if isinstance(data, dict) else None
        if not isinstance(ema, safe_pickle.Record) or ema.name != "IMMPrecond":
            raise NeonError(f"{path}: not an IMM checkpoint (expected data['ema'] to be an IMMPrecond, "
                            f"got {ema!r})")
        args = tuple((ema.state or {}).get("_init_args") or ())
        kwargs = dict(zip(_POSITIONAL, args), **safe_pickle.init_kwargs(ema))
        refs = safe_pickle.module_state_dict(ema)
        return kwargs, neon_checkpoint.Checkpoint(path, "pickle", "ema", ema.name, refs).state_dict()
    if fmt == "pth":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's own message is long and multi-line
            raise NeonError(f"{path}: cannot be read as a torch.save file ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("neon_family") != "imm" or not isinstance(data.get("ema"), dict):
            raise NeonError(f"{path}: not an IMM checkpoint (no IMM pickle and no neon_family='imm' container)")
        return dict(data.get("init_kwargs") or {}), dict(data["ema"])
    raise NeonError(f"{path}: {fmt} is not an IMM checkpoint format")


def build_network(kwargs: dict, device: torch.device | str = "cpu", temb_type: str | None = None) -> IMMPrecond:
    """An IMMPrecond from recorded constructor kwargs. temb_type overrides the recorded one (the official way
    to load imagenet256_s_a1.pkl is network.temb_type=identity on top of the ts config)."""
    kwargs = dict(kwargs)
    if temb_type is not None:
        kwargs["temb_type"] = temb_type
    try:
        with torch.device(device):
            return IMMPrecond(**kwargs)
    except TypeError as e:
        raise NeonError(f"IMM network config not understood: {e}") from None


def load_network(path: str, device: torch.device | str = "cpu", temb_type: str | None = None,
                 trust_architecture: bool = False) -> IMMPrecond:
    """Checkpoint -> IMMPrecond in eval mode on `device`, weights loaded strictly from `ema`.

    The network is built on the meta device and the checkpoint's tensors are assigned to it, so a DiT-XL/2
    (675M parameters) is neither initialised nor held twice in memory. Mixed precision recorded in the file (the
    Neon training config had fp16) is dropped: precision is the caller's choice (sampler / trainer autocast)."""
    kwargs, state_dict = read_checkpoint(path, trust_architecture)
    kwargs["mixed_precision"] = None
    net = neon_checkpoint.load_strict(lambda: build_network(kwargs, "meta", temb_type), state_dict,
                                      f"{path}: weights do not match the IMMPrecond its config describes")
    return net.to(device).eval().requires_grad_(False)


def save_network(net: IMMPrecond, path: str, template: str | None = None, trust_architecture: bool = False) -> None:
    """Write `net` atomically: into a copy of `template` (an IMM pickle or our container) when given, else into
    our own container. trust_architecture: the template's embedded source was accepted when it was loaded."""
    state_dict = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if template is not None:
        neon_checkpoint.write_like(template, path, state_dict, trust_architecture)
        return
    kwargs = dict(net.init_kwargs)
    neon_checkpoint.atomic_save({"ema": state_dict, "init_kwargs": kwargs, "class_name": "IMMPrecond",
                                 "neon_family": "imm"}, path)
