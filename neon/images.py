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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    """An ADM-style `.npz` read lazily: `len(s)`, `s.labels`, `s.seeds`, `s.read(i, j)` -> uint8 (j-i, H, W, C),
    `s.take(indices)`. A stored (uncompressed) `arr_0` — what this project writes, and np.savez — is
    memory-mapped, so a rank touches only the images it reads; a compressed one is read whole once."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise NeonError(f"{path}: image set not found")
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if "arr_0.npy" not in names:
                    raise NeonError(f"{path}: no arr_0 (expected ADM-style uint8 NHWC images)")
                self.array = _stored_member(path, zf.getinfo("arr_0.npy"))
            if self.array is None:
                with np.load(path, allow_pickle=False) as f:
                    self.array = f["arr_0"]
            self.labels = _small_array(path, "arr_1") if "arr_1.npy" in names else None
            self.seeds = _small_array(path, "seeds") if "seeds.npy" in names else None
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise NeonError(f"{path}: not a readable .npz ({e})") from None
        self.shape = tuple(self.array.shape)
        if self.array.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] not in (1, 3):
            raise NeonError(f"{path}: arr_0 must be uint8 (N, H, W, 3) or (N, H, W, 1), got {self.array.dtype} {self.shape}")
        if self.labels is not None and len(self.labels) != len(self):
            raise NeonError(f"{path}: {len(self.labels)} labels for {len(self)} images")

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop])

    def take(self, indices) -> np.ndarray:
        return np.ascontiguousarray(self.array[np.asarray(indices, dtype=np.int64)])

    def batches(self, batch: int) -> Iterable[tuple[int, np.ndarray]]:
        for i in range(0, len(self), batch):
            yield i, self.read(i, i + batch)


def _stored_member(path: str, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A read-only memmap of an uncompressed .npy member of a zip (None if compressed)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # zip local file header: 30 bytes, name and extra lengths at 26..29
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return None
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _small_array(path: str, name: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        return f[name].astype(np.int64)


class FolderImages:
    """A folder of PNG/JPEG images (sorted by relative path), with labels from an EDM-style `dataset.json`
    ({"labels": [[relative path, label], ...]}) when present; same reading methods as NpzImages."""

    def __init__(self, folder: str):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise NeonError(f"{folder}: image folder not found")
        self.path = folder
        self.files = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                            for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise NeonError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images found")
        self.seeds = None
        self.labels = None
        meta = os.path.join(folder, "dataset.json")
        if os.path.isfile(meta):
            with open(meta) as f:
                table = {k.replace("\\", "/"): v for k, v in (json.load(f).get("labels") or [])}
            missing = [f for f in self.files if f not in table]
            if missing:
                raise NeonError(f"{meta}: no label for {missing[0]}")
            self.labels = np.array([table[f] for f in self.files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices) -> np.ndarray:
        images = [_read_image(os.path.join(self.path, self.files[i])) for i in indices]
        if len({im.shape for im in images}) > 1:
            raise NeonError(f"{self.path}: images of different sizes in one batch; resize them to one size first")
        return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.take(range(start, min(stop, len(self))))


def _read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 1) for a grey image, (H, W, 3) otherwise."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("1", "L", "I;16", "I"):
            return np.asarray(im.convert("L"))[..., None]
        return np.asarray(im.convert("RGB"))


def open_images(path: str) -> NpzImages | FolderImages:
    """An image set on disk: an ADM-style `.npz` or a folder of images."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return FolderImages(path)
    if os.path.isfile(path) and path.endswith(".npz"):
        return NpzImages(path)
    if not os.path.exists(path):
        raise NeonError(f"image set not found: {path}")
    raise NeonError(f"{path}: expected an .npz with arr_0 or a folder of images")


def load_image_folder(folder: str) -> tuple[np.ndarray, np.ndarray | None]:
    """All images of a folder as uint8 NHWC, and their labels (None without a dataset.json)."""
    images = FolderImages(folder)
    return images.read(0, len(images)), images.labels


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
