"""NVIDIA's Inception detector (`inception-2015-12-05.pkl`, StyleGAN3's and EDM's fid.py), run without
executing anything from the file.

EDM's fid.py does `pickle.load(f)` and calls `net(images_uint8_nchw, return_features=True)`. Unpickling runs
whatever the pickle names, and loading TorchScript runs the archive's own code (its `__setstate__` methods at
load time, which can write files through `aten::from_file`). So only the weights are read, with the restricted
unpickler of `neon.safe_pickle`, and they run in `NvidiaInception`, our implementation of that detector's
forward on torch-fidelity's layers (the detector is one fixed architecture). The file may be:
- a `torch_utils.persistence` pickle (StyleGAN3's format for its networks): each object becomes an inert
  record, the embedded source is never compiled;
- a bare TorchScript archive (StyleGAN2-ADA's `inception-2015-12-05.pt`), or a pickle holding one as a byte
  string (found by parsing the pickle with pickletools, never unpickling it): the tensors of the archive's
  data.pkl are read; its code/ folder is never compiled;
- 'fid-helper': the offline pool3 weights of neon.metrics.convert_fid_helper (no logits).
"""
from __future__ import annotations

import io
import os
import pickletools
import zipfile

import torch
import torch.nn.functional as F

from neon import paths, safe_pickle
from neon.errors import NeonError
from neon.metrics.compat import compat_architecture, load_compat_state_dict
from neon.metrics.convert_fid_helper import ensure_converted
from neon.metrics.layout import inception_state_dict

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
    except (zipfile.BadZipFile, ValueError):
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


# ---- torch_utils.persistence pickles -------------------------------------------------------------------

def _latin1(text: str, encoding: str = "latin1") -> bytes:  # protocol 2's way of pickling bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise safe_pickle.Refused("unexpected text encoding")
    return text.encode("latin-1")


def _reconstructor(cls, base, state):  # copyreg._reconstructor, for protocol 0/1 pickles of module records
    if not (isinstance(cls, type) and issubclass(cls, safe_pickle.Record)):
        raise safe_pickle.Refused("refusing to reconstruct a non-module object")
    return cls()


# What StyleGAN3's pickles name beyond the checkpoint allow-list; module classes (torch.nn and those of the
# embedded source, `_imported_module_*`) become inert records.
_DETECTOR_NAMES = {
    "_codecs.encode": _latin1,
    "copyreg._reconstructor": _reconstructor,
    "builtins.set": set, "__builtin__.set": set,
    "builtins.object": object, "__builtin__.object": object,
    "dnnlib.util.EasyDict": dict,
}


def load_persistent_inception(data: bytes, path: str) -> NvidiaInception:
    """NvidiaInception with the weights of a torch_utils.persistence pickle of NVIDIA's InceptionV3."""
    root = safe_pickle.unpickle(io.BytesIO(data), path, extra=_DETECTOR_NAMES, prefixes=("_imported_module_",))
    return _inception(root, path)


def _inception(root, path: str) -> NvidiaInception:
    try:
        return NvidiaInception(inception_state_dict(root))
    except NeonError as e:
        raise NeonError(f"{path}: {e}") from None


# ---- entry point -----------------------------------------------------------------------------------------

def load_nvidia_detector(path: str | os.PathLike) -> NvidiaInception:
    """NVIDIA's detector on CPU, from its pickle, a TorchScript file, or 'fid-helper' (see the module doc)."""
    if str(path) == "fid-helper":
        return NvidiaInception(load_compat_state_dict(ensure_converted()))
    data = paths.read_input(os.fspath(path), "detector file")   # a regular file, read to its size
    if is_torchscript_archive(data):
        return _inception(safe_pickle.read_torchscript(data, str(path)), str(path))
    archives = embedded_archives(data)
    if len(archives) > 1:
        raise NeonError(f"{path}: {len(archives)} TorchScript archives inside; expected one")
    if archives:
        return _inception(safe_pickle.read_torchscript(archives[0], str(path)), str(path))
    return load_persistent_inception(data, str(path))
