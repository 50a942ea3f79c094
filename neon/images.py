"""Image sets on disk: ADM-style `.npz` (`arr_0` uint8 NHWC, `arr_1` int64 labels, `seeds`), PNG folders.

`.npz` files are written uncompressed and streamed array by array, so a set larger than memory can be
joined from shards, and read back in slices without loading `arr_0` whole.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from typing import Iterable

import numpy as np

from neon.checkpoint import atomic_path
from neon.errors import NeonError


def write_npz(path: str, arrays: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]]) -> None:
    """Write an `.npz` atomically; each array is (shape, dtype, chunks) and is streamed chunk by chunk
    (the chunks, concatenated along dim 0, must fill `shape` exactly)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in arrays.items():
                dtype = np.dtype(dtype)
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": tuple(int(s) for s in shape)}
                expected = math.prod(header["shape"]) * dtype.itemsize
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, header)
                    written = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        f.write(chunk.tobytes())
                        written += chunk.nbytes
                if written != expected:
                    raise NeonError(f"{path}: array {name} got {written} bytes, expected {expected}")


def save_images_npz(path: str, images: np.ndarray, labels: np.ndarray | None = None,
                    seeds: np.ndarray | None = None) -> None:
    """Write one in-memory image set (uint8 NHWC) as an ADM-style `.npz`."""
    arrays = {"arr_0": (images.shape, np.uint8, [images])}
    if labels is not None:
        arrays["arr_1"] = (labels.shape, np.int64, [labels])
    if seeds is not None:
        arrays["seeds"] = (seeds.shape, np.int64, [seeds])
    write_npz(path, arrays)


class NpzImages:
    """Read an ADM-style `.npz` lazily: `len(s)`, `s.labels`, `s.seeds`, `s.read(i, j)` -> uint8 (j-i, H, W, 3)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise NeonError(f"{path}: image set not found")
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise NeonError(f"{path}: not an .npz file") from None
        names = self._zip.namelist()
        if "arr_0.npy" not in names:
            raise NeonError(f"{path}: no arr_0 (expected ADM-style uint8 NHWC images)")
        self.shape, self.dtype, self._offset = self._header("arr_0.npy")
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] not in (1, 3):
            raise NeonError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {self.dtype} {self.shape}")
        info = self._zip.getinfo("arr_0.npy")
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored:
            with open(path, "rb") as f:  # local file header: 30 bytes, then name and extra field
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
            self._data_start = info.header_offset + 30 + name_len + extra_len + self._offset
        self._all = None if stored else np.load(path)["arr_0"]  # compressed files are read whole
        self.labels = self._small("arr_1.npy") if "arr_1.npy" in names else None
        self.seeds = self._small("seeds.npy") if "seeds.npy" in names else None
        if self.labels is not None and len(self.labels) != len(self):
            raise NeonError(f"{path}: {len(self.labels)} labels for {len(self)} images")

    def _header(self, name):
        with self._zip.open(name) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise NeonError(f"{self.path}: unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise NeonError(f"{self.path}: Fortran-ordered arrays are not supported")
            return shape, dtype, f.tell()

    def _small(self, name) -> np.ndarray:
        with self._zip.open(name) as f:
            return np.lib.format.read_array(f).astype(np.int64)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        if self._all is not None:
            return self._all[start:stop]
        item = int(np.prod(self.shape[1:]))
        out = np.empty((max(stop - start, 0),) + tuple(self.shape[1:]), dtype=np.uint8)
        with open(self.path, "rb") as f:  # a stored zip member is a plain byte range of the file
            f.seek(self._data_start + start * item)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise NeonError(f"{self.path}: file is truncated")
        return out

    def batches(self, batch: int) -> Iterable[tuple[int, np.ndarray]]:
        for i in range(0, len(self), batch):
            yield i, self.read(i, i + batch)


def load_image_folder(folder: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A folder of PNG/JPEG images (sorted by path) -> uint8 NHWC, and labels from an EDM-style
    `dataset.json` ({"labels": [[relative path, label], ...]}) when present."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise NeonError(f"{folder}: image folder not found")
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise NeonError(f"{folder}: no .png/.jpg images found")
    images = np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files])
    labels = None
    meta = os.path.join(folder, "dataset.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            table = dict((k.replace("\\", "/"), v) for k, v in (json.load(f).get("labels") or []))
        missing = [f for f in files if f.replace(os.sep, "/") not in table]
        if missing:
            raise NeonError(f"{meta}: no label for {missing[0]}")
        labels = np.array([table[f.replace(os.sep, "/")] for f in files], dtype=np.int64)
    return images, labels


def export_png(images: NpzImages, folder: str, batch: int = 1000) -> None:
    """Write every image as `folder/<seed or index>.png` and an EDM-style `dataset.json` with the labels."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    names = []
    for start, chunk in images.batches(batch):
        for i, img in enumerate(chunk):
            idx = start + i
            name = f"{int(images.seeds[idx]) if images.seeds is not None else idx:08d}.png"
            with atomic_path(os.path.join(folder, name)) as tmp:
                Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(tmp, format="PNG")
            names.append(name)
    if images.labels is not None:
        with atomic_path(os.path.join(folder, "dataset.json")) as tmp, open(tmp, "w") as f:
            json.dump({"labels": [[n, int(l)] for n, l in zip(names, images.labels)]}, f)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 (B, H, W, C) -> one uint8 (rows·H, cols·W, C) grid, for previews."""
    b, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(b):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = images[i]
    return grid
