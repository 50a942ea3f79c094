"""Fashion-MNIST from Debian's dataset-fashion-mnist: our idx reader, the 16×16 preprocessing, the missing-package
error. Most tests write their own tiny idx files; one reads the installed package when it is there."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from experiments.fashion_mnist.datasets import (
    DEFAULT_ROOT,
    INSTALL_HINT,
    downsample_16,
    load_fashion_mnist,
    read_idx,
    to_model_range,
    write_idx,
)
from neon.errors import NeonError


def write_fake_split(root, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return images, labels


def test_idx_header_is_the_documented_layout(tmp_path):
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    write_idx(str(tmp_path / "a"), a)
    raw = (tmp_path / "a").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 2])                       # zero, zero, ubyte, two dimensions
    assert struct.unpack(">2I", raw[4:12]) == (2, 3) and raw[12:] == a.tobytes()


def test_read_idx_returns_the_array_written(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    write_idx(str(tmp_path / "a.gz"), a)
    with gzip.open(tmp_path / "a.gz") as f:   # really gzipped, as the Debian package ships them
        assert f.read(4) == bytes([0, 0, 0x08, 3])
    b = read_idx(str(tmp_path / "a.gz"))
    assert b.dtype == np.uint8 and np.array_equal(a, b)


def test_read_idx_refuses_other_files_and_truncated_ones(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(NeonError, match="not an idx file"):
        read_idx(str(tmp_path / "junk"))
    a = np.zeros((4, 3), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 2]) + struct.pack(">2I", *a.shape)
    (tmp_path / "short").write_bytes(header + a.tobytes()[:-1])
    with pytest.raises(NeonError, match="truncated"):
        read_idx(str(tmp_path / "short"))


def test_downsample_pads_with_background_then_averages_2x2_blocks():
    images = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    out = downsample_16(images)
    assert out.shape == (3, 16, 16, 1) and out.dtype == np.uint8
    padded = np.zeros((3, 32, 32), dtype=np.int64)
    padded[:, 2:30, 2:30] = images
    for n in range(3):
        for i in range(16):
            for j in range(16):
                s = padded[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2].sum()
                assert out[n, i, j, 0] == (s + 2) // 4   # the mean, rounded half up
    assert (out[:, 0, :] == 0).all() and (out[:, :, 0] == 0).all()   # the first row/column is pure padding


def test_model_range_maps_uint8_to_minus_one_one():
    x = to_model_range(np.array([0, 255], dtype=np.uint8).reshape(1, 1, 2, 1))
    assert x.shape == (1, 1, 1, 2) and x.dtype == np.float32
    assert x.min() == -1 and x.max() == 1


def test_loader_reads_a_folder_of_idx_files(tmp_path):
    images, labels = write_fake_split(tmp_path, "test", 30)
    x, y = load_fashion_mnist("test", str(tmp_path))
    assert x.shape == (30, 16, 16, 1) and y.dtype == np.int64
    assert np.array_equal(x, downsample_16(images)) and np.array_equal(y, labels)


def test_missing_package_says_how_to_install_it(tmp_path):
    with pytest.raises(NeonError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", str(tmp_path / "nowhere"))
    assert "dataset-fashion-mnist" in INSTALL_HINT


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(NeonError, match="split"):
        load_fashion_mnist("validation", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason=f"needs `{INSTALL_HINT}`")
def test_installed_package_has_the_fashion_mnist_splits():
    for split, n in (("train", 60_000), ("test", 10_000)):
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 16, 16, 1) and x.dtype == np.uint8
        assert np.array_equal(np.bincount(y), np.full(10, n // 10))   # both splits are balanced
