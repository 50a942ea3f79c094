"""NVIDIA's Inception detector (`inception-2015-12-05.pkl`, StyleGAN3's and EDM's fid.py), run without
executing anything from the file.

EDM's fid.py does `pickle.load(f)` and calls `net(images_uint8_nchw, return_features=True)`. Unpickling runs
whatever the pickle names, so the file is read here in one of these ways, none of which runs its code:
- a `torch_utils.persistence` pickle (StyleGAN3's format for its networks, whose embedded source every public
  port of this detector was taken from): a restricted unpickler turns each pickled object into an inert
  record (the embedded source is never compiled), rebuilds only tensors, and the weights run in
  `NvidiaInception`, our implementation of that detector's forward on torch-fidelity's layers;
- a pickle holding a TorchScript archive as a byte string: the pickle is only parsed (pickletools), the
  archive goes to `torch.jit.load`, and only TorchScript runs;
- a bare TorchScript file (StyleGAN2-ADA's `inception-2015-12-05.pt`): `torch.jit.load`;
- 'fid-helper': `NvidiaInception` with the offline pool3 weights of neon.metrics.convert_fid_helper (no logits).
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import warnings
import zipfile
from collections import OrderedDict

import torch
import torch.nn.functional as F

from neon.errors import NeonError

ZIP_MAGIC = b"PK\x03\x04"
INPUT_SIZE = 299
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_TEXT_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"}  # protocol 2 stores bytes as latin-1 text
# torch-fidelity's InceptionV3 modules in forward order, up to pool3
_COMPAT_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                  "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                  "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def nvidia_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """StyleGAN3's emulation of TF1's `resize_bilinear` (no half-pixel centres): (B, C, H, W) float ->
    (B, C, size, size). Source pixel coordinates are out_index · (in / size), which grid_sample reaches
    with its own half-pixel convention shifted by 1/in − 1/size (computed in float32, as NVIDIA does)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.to(x.dtype).expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class NvidiaInception(torch.nn.Module):
    """StyleGAN3's FID detector: uint8 (B, 3, H, W) -> its resize to 299, (x − 128) / 128, the 2015-12-05
    Inception up to pool3 (B, 2048); `output` is the 1008-way layer (NaN weights when the source had none).
    Same calling convention as NVIDIA's: `return_features=True` -> pool3, else softmax of the logits."""

    def __init__(self, compat_state: dict[str, torch.Tensor]):  # torch-fidelity layout (neon.metrics.layout)
        super().__init__()
        from neon.metrics.features import compat_architecture
        self.net = compat_architecture()
        torch.nn.Module.load_state_dict(self.net, compat_state)  # the skeleton's own load_state_dict is a no-op
        self.output = self.net.fc

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        x = (nvidia_resize(img.to(torch.float32)) - 128) / 128
        for name in _COMPAT_LAYERS:
            x = getattr(self.net, name)(x)
        features = x.flatten(1)
        if return_features:
            return features
        logits = features @ self.output.weight.T + (0 if no_output_bias else self.output.bias)
        return logits.softmax(dim=1)


# ---- TorchScript, bare or inside a pickle ----------------------------------------------------------------

def is_torchscript_archive(blob: bytes) -> bool:
    """A zip with `<root>/data.pkl` and `<root>/code/...`: TorchScript's layout (torch.save zips have no code/)."""
    if not blob.startswith(ZIP_MAGIC):
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def embedded_archives(data: bytes) -> list[bytes]:
    """Every TorchScript archive stored as a byte string in the pickle `data`, found without unpickling."""
    found = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in _BYTES_OPS:
                blob = bytes(arg)
            elif op.name in _TEXT_OPS and isinstance(arg, str) and arg[:4] == ZIP_MAGIC.decode("latin-1"):
                try:
                    blob = arg.encode("latin-1")
                except UnicodeEncodeError:
                    continue
            else:
                continue
            if is_torchscript_archive(blob):
                found.append(blob)
    except Exception:  # not a pickle, or truncated: the other readers will say so
        return []
    return found


def _jit_load(blob: bytes) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(io.BytesIO(blob), map_location="cpu")


# ---- torch_utils.persistence pickles -------------------------------------------------------------------

class _Record:
    """Stands in for any object the pickle builds (a persistent network, an nn.Sequential, a pooling layer):
    it keeps the pickled state, has no behaviour, and nothing of the original class runs."""
    class_name = "?"

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


def _persistent_record(meta) -> _Record:
    """Replaces torch_utils.persistence._reconstruct_persistent_obj, which would exec meta['module_src']."""
    record = _Record()
    record.class_name = str(meta.get("class_name", "?")) if isinstance(meta, dict) else "?"
    state = meta.get("state") if isinstance(meta, dict) else None
    record.state = dict(state) if isinstance(state, dict) else {}
    return record


def _storage_from_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)  # tensors only


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise NeonError(f"detector pickle: unexpected text encoding {encoding!r}")
    return text.encode("latin-1")


def _reconstructor(cls, base, state):  # copyreg._reconstructor, for protocol 0/1 pickles of our records
    if not (isinstance(cls, type) and issubclass(cls, _Record)):
        raise NeonError("detector pickle: refusing to reconstruct a non-module object")
    return cls()


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("_codecs", "encode"): _latin1,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "object"): object, ("__builtin__", "object"): object,
    ("dnnlib.util", "EasyDict"): dict,
}


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("torch.nn.modules.") or module.startswith("_imported_module_"):
            return type(name, (_Record,), {"class_name": name})  # a module class: an inert record of its state
        raise NeonError(f"detector pickle names {module}.{name}, which is not part of an Inception network; refusing")


def _record_tensors(record: _Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a record tree, under nn.Module's dotted names."""
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, t in (record.state.get(group) or {}).items():
            if isinstance(t, torch.Tensor):
                out[prefix + name] = t.detach()
    for name, child in (record.state.get("_modules") or {}).items():
        if isinstance(child, _Record):
            out.update(_record_tensors(child, f"{prefix}{name}."))
    return out


def _record_geometry(root: _Record):
    def geometry(path: str):
        node = root.state["_modules"]["layers"]
        for name in path.split("."):
            node = node.state["_modules"][name]
        return (node.state["stride"], node.state["padding"]) if "stride" in node.state else None
    return geometry


def load_persistent_inception(data: bytes, path: str) -> NvidiaInception:
    """NvidiaInception with the weights of a torch_utils.persistence pickle of NVIDIA's InceptionV3."""
    from neon.metrics.layout import compat_state_dict
    try:
        root = _RecordUnpickler(io.BytesIO(data)).load()
    except NeonError as e:
        raise NeonError(f"{path}: {e}") from None
    except Exception as e:
        raise NeonError(f"{path}: not a readable detector pickle ({type(e).__name__}: {e})") from None
    if not isinstance(root, _Record) or "layers" not in (root.state.get("_modules") or {}):
        raise NeonError(f"{path}: no Inception network ('layers') in this pickle")
    return NvidiaInception(compat_state_dict(_record_tensors(root), "layers.", _record_geometry(root)))


# ---- entry point -----------------------------------------------------------------------------------------

def load_nvidia_detector(path: str | os.PathLike) -> torch.nn.Module:
    """NVIDIA's detector on CPU, from its pickle, a TorchScript file, or 'fid-helper' (see the module doc)."""
    if str(path) == "fid-helper":
        from neon.metrics.convert_fid_helper import ensure_converted
        from neon.metrics.features import load_compat_state_dict
        return NvidiaInception(load_compat_state_dict(ensure_converted()))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise NeonError(f"detector file not found: {path}") from None
    if is_torchscript_archive(data):
        return _jit_load(data)
    archives = embedded_archives(data)
    if len(archives) > 1:
        raise NeonError(f"{path}: {len(archives)} TorchScript archives inside; expected one")
    if archives:
        return _jit_load(archives[0])
    return load_persistent_inception(data, str(path))
