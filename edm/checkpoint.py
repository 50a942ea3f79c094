"""Reading and writing EDM networks.

Reading (`load_network`, `load_snapshot`) accepts:
- an official EDM snapshot pickle (`network-snapshot-*.pkl`, the released `edm-*.pkl`, the Neon releases, and
  files written by `save_pickle`): a pickled dict {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'} of
  `torch_utils.persistence` objects. It is read by `neon.safe_pickle` (an allow-list unpickler that never runs
  the source code embedded in the file); the preconditioner class is the class name recorded for 'ema'
  (EDMPrecond, VPPrecond, ...), its constructor arguments are the recorded `_init_kwargs`, and the weights are
  loaded strictly into our own network (edm/networks.py);
- our own container (`save_container`): torch.save({'ema': state_dict, 'class_name', 'init_kwargs',
  'neon_family': 'edm'}), readable with torch.load(weights_only=True);
- a safetensors export (`export_safetensors`) whose metadata holds class_name and init_kwargs.

Writing a Neon network in the official container (`save_pickle`): a copy of the pickle the base network was
loaded from (the template) with only the bytes of the 'ema' tensors replaced (`neon.checkpoint.write_like`).
Every opcode, the embedded source code, the recorded constructor arguments, 'loss_fn', 'augment_pipe' and
'dataset_kwargs' stay as they were, so the official tools read the result exactly as they read the template:
`generate.py --network=<file>` and `fid.py`/`calculate_fid.py` do `pickle.load(f)['ema']`, which rebuilds the
template's classes from the embedded source and gets our weights; `train.py --transfer=<file>` copies them.
(The official unpickler needs the official `torch_utils` and `dnnlib` packages on sys.path; it executes the
embedded source, which is why we never use it.)
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch

from edm.networks import PRECONDS
from neon import safe_pickle
from neon.checkpoint import atomic_open, atomic_save, detect_format, load_strict, write_like
from neon.errors import NeonError

FAMILY = "edm"

# Normalised SHA-256 (neon.safe_pickle.source_sha256) of every official version of the files whose classes EDM
# pickles carry as `module_src`: NVlabs/edm training/networks.py (EDMPrecond, VPPrecond, SongUNet, DhariwalUNet
# and their blocks), training/loss.py (EDMLoss, VPLoss, VELoss) and training/augment.py (AugmentPipe), at every
# commit of the official repository that changed them; the Neon repository (SinaAlemohammad/Neon @76496c3,
# edm/training/) holds the same three files byte for byte as NVlabs/edm @b2a26c9. Obtained by hashing
# `git show <commit>:<path>` of each file in those repositories' history (the released pickles embed the text of
# the file their class came from, inspect.getsource of its module). A fork with other code is refused.
OFFICIAL_SOURCES = {
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef": "NVlabs/edm@0a2ff34 training/networks.py",
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284":
        "NVlabs/edm@b2a26c9..008a4e5 training/networks.py (= SinaAlemohammad/Neon@76496c3 edm/training/networks.py)",
    "b26f0937bc72b18cc5f9869c86035ca9b872138cdfae7994237e9733951e4415": "NVlabs/edm@0a2ff34..008a4e5 training/loss.py",
    "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5":
        "NVlabs/edm@0a2ff34..008a4e5 training/augment.py",
}


def plain(value: Any) -> Any:
    """Constructor kwargs as plain Python values (numpy scalars -> float/int, tuples -> lists), so they survive
    torch.load(weights_only=True) and JSON."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:   # numpy scalars
        return value.item()
    raise NeonError(f"unsupported constructor argument value {value!r}")


def build_network(class_name: str, init_kwargs: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Our network for an official class name and its recorded constructor kwargs (weights uninitialised when
    device='meta')."""
    if class_name not in PRECONDS:
        raise NeonError(f"unknown EDM network class {class_name!r} (known: {', '.join(PRECONDS)})")
    try:
        with torch.device(device):
            return PRECONDS[class_name](**init_kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise NeonError(f"cannot build {class_name} from the recorded arguments: {e}") from None


def network_from_state(class_name: str, init_kwargs: dict, state_dict: dict[str, torch.Tensor],
                       device: torch.device | str = "cpu") -> torch.nn.Module:
    """Our network with the weights loaded strictly (built on the meta device: no init cost), on `device`,
    in eval mode."""
    net = load_strict(lambda: build_network(class_name, init_kwargs, "meta"), state_dict,
                      f"weights do not match {class_name}")
    return net.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Reading.

def load_snapshot(path: str, device: torch.device | str = "cpu",
                  trust_architecture: bool = False) -> tuple[torch.nn.Module, dict]:
    """(the 'ema' network in eval mode on `device`, info). info: format ('pickle', 'container' or
    'safetensors'), class_name, init_kwargs, and for pickles the recorded loss ('loss_class', 'loss_kwargs')
    and augmentation ('augment_kwargs', None when the snapshot has no augment pipe), and trust_architecture
    (True) where it was given. A pickle whose embedded source is not an official release's is refused unless
    trust_architecture (see OFFICIAL_SOURCES)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NeonError(f"{path}: checkpoint not found")
    fmt = detect_format(path)
    if fmt == "pickle":
        return _load_pickle(path, device, trust_architecture)
    if fmt == "pth":
        return _load_container(path, device)
    return _load_safetensors(path, device)


def load_network(path: str, device: torch.device | str = "cpu", trust_architecture: bool = False) -> torch.nn.Module:
    """The 'ema' network of an EDM checkpoint, in eval mode on `device` (see the module docstring)."""
    return load_snapshot(path, device, trust_architecture)[0]


def _load_pickle(path: str, device, trust_architecture: bool = False) -> tuple[torch.nn.Module, dict]:
    records: list[safe_pickle.Record] = []
    data = safe_pickle.load(path, records=records)
    safe_pickle.check_sources(records, OFFICIAL_SOURCES, path, trust_architecture)
    ema = data.get("ema") if isinstance(data, dict) else None
    if not isinstance(ema, safe_pickle.Record) or ema.kind != "persistent":
        raise NeonError(f"{path}: not an EDM snapshot (expected a dict with a persistent 'ema' network)")
    class_name, init_kwargs = ema.name, plain(safe_pickle.init_kwargs(ema))
    net = network_from_state(class_name, init_kwargs, safe_pickle.module_state_dict(ema), device)
    info = dict(format="pickle", class_name=class_name, init_kwargs=init_kwargs)
    info.update(_recorded_training(data))
    if trust_architecture:   # `save_pickle` copies this file, whose source the caller accepted
        info["trust_architecture"] = True
    return net, info


def _recorded_training(data: dict) -> dict:
    """The loss and augmentation a snapshot was trained with (its 'loss_fn' and 'augment_pipe' records)."""
    info: dict[str, Any] = {"loss_class": None, "loss_kwargs": {}, "augment_kwargs": None}
    loss = data.get("loss_fn")
    if isinstance(loss, safe_pickle.Record) and isinstance(loss.state, dict):
        info["loss_class"] = loss.name
        info["loss_kwargs"] = {k: plain(v) for k, v in loss.state.items() if not k.startswith("_")}
    pipe = data.get("augment_pipe")
    if isinstance(pipe, safe_pickle.Record):
        info["augment_kwargs"] = plain(safe_pickle.init_kwargs(pipe))
    return info


def _load_container(path: str, device) -> tuple[torch.nn.Module, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:  # what torch.load raises
        raise NeonError(f"{path}: not a readable EDM container ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or obj.get("neon_family") != FAMILY or not isinstance(obj.get("ema"), dict):
        raise NeonError(f"{path}: not an EDM container (expected {{'ema': state_dict, 'class_name', 'init_kwargs', "
                        "'neon_family': 'edm'}}); a bare state dict needs its network's class and arguments")
    net = network_from_state(obj["class_name"], obj["init_kwargs"], obj["ema"], device)
    info = dict(format="container", class_name=obj["class_name"], init_kwargs=obj["init_kwargs"])
    info.update({k: obj[k] for k in ("loss_class", "loss_kwargs", "augment_kwargs") if k in obj})
    return net, info


def _load_safetensors(path: str, device) -> tuple[torch.nn.Module, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("neon_family") != FAMILY or "class_name" not in meta or "init_kwargs" not in meta:
        raise NeonError(f"{path}: safetensors file without EDM metadata (class_name, init_kwargs)")
    init_kwargs = json.loads(meta["init_kwargs"])
    net = network_from_state(meta["class_name"], init_kwargs, load_file(path), device)
    return net, dict(format="safetensors", class_name=meta["class_name"], init_kwargs=init_kwargs)


# ---------------------------------------------------------------------------------------------------------
# Writing.

def state_dict_cpu(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def save_pickle(net: torch.nn.Module, template: str, path: str, trust_architecture: bool = False) -> None:
    """Write `net`'s weights into a copy of the official snapshot `template` (see the module docstring);
    trust_architecture: the template's embedded source was accepted on load (`load_snapshot`'s info says so)."""
    write_like(template, path, state_dict_cpu(net), trust_architecture)


def save_container(net: torch.nn.Module, path: str, class_name: str, init_kwargs: dict, **extra) -> None:
    """Our own container: the network under 'ema' (so the core finds and merges it), plus what rebuilds it."""
    obj = {"ema": state_dict_cpu(net), "class_name": class_name, "init_kwargs": plain(init_kwargs),
           "neon_family": FAMILY}
    obj.update(plain(extra))
    atomic_save(obj, path)


def export_state_dict(net: torch.nn.Module, path: str) -> None:
    """A bare state dict (torch.save), e.g. for `load_state_dict` into the official EDMPrecond."""
    atomic_save(state_dict_cpu(net), path)


def export_safetensors(net: torch.nn.Module, path: str, class_name: str, init_kwargs: dict) -> None:
    """The state dict as safetensors, with class_name and init_kwargs (JSON) in its metadata."""
    from safetensors.torch import save
    meta = {"neon_family": FAMILY, "class_name": class_name, "init_kwargs": json.dumps(plain(init_kwargs))}
    data = save(state_dict_cpu(net), metadata=meta)
    with atomic_open(path) as f:
        f.write(data)
