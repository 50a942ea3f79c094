"""Fashion-MNIST, read offline from Debian's `dataset-fashion-mnist` package, at 16×16.

The package installs the four original idx files, gzipped, in /usr/share/datasets/fashion-mnist/:
`{train,t10k}-images-idx3-ubyte.gz` (uint8 N×28×28, 0 = background) and `{train,t10k}-labels-idx1-ubyte.gz`
(uint8 N, classes 0..9). We read them with our own idx parser, pad 28 → 32 with background (two pixels on each
side, as the classic LeNet input) and average 2×2 blocks → 16×16, rounded back to uint8 for storage. Training
code maps uint8 u to u / 127.5 − 1 in [−1, 1] (the EDM family's `encode` does exactly that).
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from neon.errors import NeonError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_DTYPES = {0x08: np.uint8}   # the idx type codes Fashion-MNIST uses (0x08 = unsigned byte)


def read_idx(path: str) -> np.ndarray:
    """One idx file (gzipped or not) -> its array. Header: two zero bytes, a type code, the number of
    dimensions, then each dimension as a big-endian uint32; the data follow in C order."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise NeonError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] not in IDX_DTYPES:
        raise NeonError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise NeonError(f"{path}: {body.size} values for shape {shape} (truncated file?)")
    return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """The inverse of `read_idx` for uint8 arrays (gzipped when `path` ends in .gz); tests write fake splits."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise NeonError(f"write_idx: expected uint8, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def downsample_16(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, 16, 16, 1): pad to 32×32 with 0, mean of each 2×2 block, rounded
    half up."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise NeonError(f"expected uint8 (N, 28, 28) images, got {images.dtype} {images.shape}")
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.uint16)
    block_sums = padded.reshape(-1, 16, 2, 16, 2).sum(axis=(2, 4))
    return ((block_sums + 2) // 4).astype(np.uint8)[..., None]


def _path(root: str, split: str, kind: str) -> str:
    return os.path.join(root, f"{SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz")


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """('train' | 'test') -> (uint8 (N, 16, 16, 1) images, int64 (N,) labels in [0, 10)).
    N = 60,000 for train and 10,000 for test."""
    if split not in SPLITS:
        raise NeonError(f"Fashion-MNIST split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = root or DEFAULT_ROOT
    paths = [_path(root, split, kind) for kind in ("images", "labels")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise NeonError(f"Fashion-MNIST not found ({missing[0]} is missing): install it with `{INSTALL_HINT}`")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise NeonError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= len(CLASSES):
        raise NeonError(f"{paths[1]}: label {int(labels.max())} out of range")
    return downsample_16(images), labels.astype(np.int64)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [−1, 1]."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
