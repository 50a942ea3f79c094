"""Image sets on disk: ADM-style `.npz` (`arr_0` uint8 NHWC, `arr_1` int64 labels, `seeds`), PNG folders.

`.npz` files are written uncompressed and streamed array by array, so a set larger than memory can be
joined from shards, and read back in slices without loading `arr_0` whole.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zipfile
from collections.abc import Iterable

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


# ---- reading .npz members, every header checked before a byte of data is read -------------------------------

# Deflate cannot expand data more than about 1032-fold: a member claiming more is not a real deflate stream.
_DEFLATE_MAX_RATIO = 1032


@dataclasses.dataclass
class NpyMember:
    """One `.npy` member of a zip, its header checked against the zip's own record of the member."""
    name: str
    shape: tuple
    dtype: np.dtype
    fortran: bool
    info: zipfile.ZipInfo
    header_len: int          # bytes of .npy magic + header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def npy_member(path: str, zf: zipfile.ZipFile, name: str) -> NpyMember:
    """The header of `name.npy` in `zf`, refused (one NeonError line) unless the data it declares is exactly
    what the zip member holds: no object dtype, no size past the file, no compressed size a zip bomb claims."""
    where = f"{path}: array {name!r}"
    info = zf.getinfo(name + ".npy")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise NeonError(f"{where} uses zip compression method {info.compress_type} (only stored or deflated)")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise NeonError(f"{where} claims {info.file_size} bytes from {info.compress_size} compressed ones, more than "
                        f"deflate can produce")
    if info.header_offset + info.compress_size > os.path.getsize(path):
        raise NeonError(f"{where} claims {info.compress_size} stored bytes, past the end of the file")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise NeonError(f"{where}: unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
            header_len = f.tell()
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise NeonError(f"{where}: not a readable .npy header ({e})") from None
    if dtype.hasobject:
        raise NeonError(f"{where} has an object dtype (pickled Python objects), which is never read")
    member = NpyMember(name, tuple(int(n) for n in shape), dtype, bool(fortran), info, header_len)
    if header_len + member.nbytes != info.file_size:
        raise NeonError(f"{where} declares shape {member.shape} {dtype} ({member.nbytes} bytes) but the member "
                        f"holds {info.file_size - header_len}")
    return member


def read_member(path: str, zf: zipfile.ZipFile, member: NpyMember) -> np.ndarray:
    """The whole array of a checked member (its size is known to be what the zip holds)."""
    try:
        with zf.open(member.info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise NeonError(f"{path}: array {member.name!r} is not readable ({e})") from None


def read_npy(path: str) -> np.ndarray:
    """A plain `.npy` file, its header checked first (as `npy_member` checks a zip member): no object dtype, and
    exactly the bytes the header declares, so a header claiming terabytes is one NeonError, not a MemoryError."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise NeonError(f"{path}: unsupported .npy version {version}")
            shape, _, dtype = read_header(f)
            if dtype.hasobject:
                raise NeonError(f"{path}: object dtype (pickled Python objects), which is never read")
            declared = math.prod(shape) * dtype.itemsize
            if f.tell() + declared != os.path.getsize(path):
                raise NeonError(f"{path}: declares shape {tuple(shape)} {dtype} ({declared} bytes) but holds "
                                f"{os.path.getsize(path) - f.tell()}")
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise NeonError(f"{path}: not a readable .npy file ({e})") from None


def npz_names(path: str) -> set[str]:
    """The array names of an `.npz`, nothing read."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise NeonError(f"{path}: not a readable .npz ({e})") from None


def read_npz(path: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The named arrays of an `.npz` (missing `required` ones refused), each header checked first."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            missing = [n for n in required if n not in names]
            if missing:
                raise NeonError(f"{path}: expected arrays {' and '.join(map(repr, required))}, found "
                                f"{sorted(names) or 'none'}")
            members = [npy_member(path, zf, n) for n in (*required, *optional) if n in names]
            return {m.name: read_member(path, zf, m) for m in members}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise NeonError(f"{path}: not a readable .npz ({e})") from None


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
                images = npy_member(path, zf, "arr_0")
                self.shape = images.shape
                if images.dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] not in (1, 3):
                    raise NeonError(f"{path}: arr_0 must be uint8 (N, H, W, 3) or (N, H, W, 1), got "
                                    f"{images.dtype} {self.shape}")
                extra = {n: npy_member(path, zf, n) for n in ("arr_1", "seeds") if n + ".npy" in names}
                for name, member in extra.items():  # checked before reading: one value per image
                    if len(member.shape) != 1 or member.shape[0] != len(self):
                        what = "labels" if name == "arr_1" else "seeds"
                        raise NeonError(f"{path}: {what} ({name}) of shape {member.shape} for {len(self)} images")
                # Labels as stored (neon finetune refuses fractional ones, which the int64 cast would truncate).
                self.label_dtype = extra["arr_1"].dtype if "arr_1" in extra else None
                self.labels, self.seeds = (read_member(path, zf, extra[n]).astype(np.int64) if n in extra else None
                                           for n in ("arr_1", "seeds"))
                self.array = _stored_memmap(path, images) if images.info.compress_type == zipfile.ZIP_STORED \
                    and not images.fortran else read_member(path, zf, images)
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise NeonError(f"{path}: not a readable .npz ({e})") from None

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop])

    def take(self, indices) -> np.ndarray:
        return np.ascontiguousarray(self.array[np.asarray(indices, dtype=np.int64)])

    def batches(self, batch: int) -> Iterable[tuple[int, np.ndarray]]:
        for i in range(0, len(self), batch):
            yield i, self.read(i, i + batch)


def _stored_memmap(path: str, member: NpyMember) -> np.ndarray:
    """A read-only memmap of an uncompressed member's data."""
    with open(path, "rb") as f:
        f.seek(member.info.header_offset + 26)  # zip local file header: 30 bytes, name and extra lengths at 26..29
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    offset = member.info.header_offset + 30 + name_len + extra_len + member.header_len
    if offset + member.nbytes > os.path.getsize(path):
        raise NeonError(f"{path}: array {member.name!r} reaches past the end of the file")
    if member.nbytes == 0:
        return np.zeros(member.shape, member.dtype)
    return np.memmap(path, dtype=member.dtype, mode="r", offset=offset, shape=member.shape)


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
        if im.mode.startswith("I"):   # 16/32-bit: PIL's convert would clip every value above 255 to white
            raise NeonError(f"{path}: a {im.mode} image (more than 8 bits per channel); save it as 8-bit first")
        if im.mode in ("1", "L"):
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
