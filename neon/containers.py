"""What kind of file a path is, told from its first bytes and its layout without loading it, so that a file of
one kind given where another is read is refused in one line that says what the file is and what reads it.

A family declares the kinds its `load` reads (`Family.CONTAINERS`); the core checks a checkpoint path against
that before the family opens it. An `.npz` image set or statistics file is never a checkpoint.
"""
from __future__ import annotations

import os
import re
import struct
import zipfile
from collections.abc import Callable

from neon.errors import NeonError
from neon.pipeline_folder import is_pipeline_folder

PIPELINE_FOLDER = "diffusers pipeline folder"
PICKLE = "EDM/IMM network pickle"
TORCH_ZIP = "torch.save zip"
LEGACY_TORCH = "legacy torch.save file"
SAFETENSORS = "safetensors file"
IMAGE_SET = "image set (.npz with arr_0)"
STATISTICS = "statistics file (.npz with mu, sigma)"
NPZ = ".npz array file"

# The kinds that are no checkpoint -> what reads them.
NOT_CHECKPOINTS = {
    IMAGE_SET: "an input of neon fid --images, neon stats and neon finetune --data",
    STATISTICS: "an input of neon fid --ref",
    NPZ: "numpy arrays, not network weights",
}

# torch.save's legacy format begins with this number, pickled (protocol 2, LONG1 of 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _zip_kind(path: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return TORCH_ZIP
    if names and all(n.endswith(".npy") for n in names):
        if "arr_0.npy" in names:
            return IMAGE_SET
        if {"mu.npy", "sigma.npy"} <= set(names):
            return STATISTICS
        return NPZ
    return None


# Our own torch.save containers record the family that saved them (a 'neon_family' entry): the pickled key
# (SHORT_BINUNICODE or BINUNICODE, maybe memoised) and its value, read from data.pkl's bytes, never unpickled.
_SAVED_BY = re.compile(rb"(?:\x8c\x0b|X\x0b\x00\x00\x00)neon_family(?:\x94|q.|r....)?(?:\x8c(.)|X(....))", re.S)
_DATA_PKL_LIMIT = 64 << 20


def saved_by(path: str) -> str | None:
    """The family that saved the torch.save zip `path` in this project's container, None if not recorded."""
    try:
        with zipfile.ZipFile(path) as z:
            member = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if member is None or z.getinfo(member).file_size > _DATA_PKL_LIMIT:
                return None
            data = z.read(member)
    except (zipfile.BadZipFile, OSError):
        return None
    m = _SAVED_BY.search(data)
    if m is None:
        return None
    size = m.group(1)[0] if m.group(1) else struct.unpack("<I", m.group(2))[0]
    name = data[m.end():m.end() + min(size, 64)]
    return name.decode("utf-8", "replace") if name.isascii() else None


def kind(path: str) -> str | None:
    """The kind of file or folder `path` is (one of the constants above), None when it is none of them or is
    not there. Reads the first bytes, and a zip's list of members, only."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return PIPELINE_FOLDER if is_pipeline_folder(path) else None
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        return _zip_kind(path)
    if head.startswith(_LEGACY_MAGIC):
        return LEGACY_TORCH
    if is_safetensors_head(head, os.path.getsize(path)):
        return SAFETENSORS   # before the pickle test: a header length may open with the pickle's byte 0x80
    if head[:1] == b"\x80":
        return PICKLE
    return None


def is_safetensors_head(head: bytes, size: int) -> bool:
    """Whether a file of `size` bytes opening with `head` (at least 9 bytes) is laid out as safetensors: an
    8-byte little-endian header length that fits in the file, then the header's JSON object. One header length in
    256 begins with the byte 0x80 that opens a pickle; no pickle also has the "{" and the fitting length."""
    return len(head) > 8 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size


def _a(what: str) -> str:
    return ("an " if what[0] in "aeiouAEIOU." else "a ") + what


def check_reads(path: str, family=None, readers: Callable[[str, str], list[str]] | None = None) -> None:
    """Refuse, in one line, a checkpoint `path` of a kind that `family` does not read (its CONTAINERS; a family
    that declares none, or None, is not checked, but an image set or statistics file is never a checkpoint).
    readers: (kind, path) -> names of the families that read it, for the message (called only when refusing)."""
    found = kind(path)
    if found is None:
        return
    if found in NOT_CHECKPOINTS:
        raise NeonError(f"{path}: {_a(found)}, not a checkpoint ({NOT_CHECKPOINTS[found]})")
    declared = tuple(getattr(family, "CONTAINERS", ()))
    if not declared:
        return
    owner = saved_by(path) if found == TORCH_ZIP else None
    if owner is not None and owner != family.name:
        raise NeonError(f"{path}: {_a(found)} that --family {owner} saved, which --family {family.name} does not "
                        f"read; it is for --family {owner}")
    takes = found in declared and getattr(family, "reads", lambda _: True)(path)
    if takes:
        return
    names = readers(found, path) if readers else []
    belongs = f"it is for --family {' or '.join(names)}" if names else "no installed family reads it"
    if found in declared:
        raise NeonError(f"{path}: {_a(found)} that --family {family.name} does not drive; {belongs}")
    raise NeonError(f"{path}: {_a(found)}, which --family {family.name} does not read (it reads: "
                    f"{', '.join(declared)}); {belongs}")
