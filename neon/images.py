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

from neon import paths
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

# What a small file may make a reader allocate. Real data never compresses as well as a bomb: deflate and PNG
# shrink photographs 1-3x and flat synthetic images tens of times at most, JPEG photographs 10-30x, float
# features hardly at all, while zeros deflate about 1000x. So what compressed data decodes to may pass
# INFLATION_FLOOR (small sets, labels and seeds compress better, and cost little) only up to MAX_INFLATION times
# its compressed size. Stored .npz members are their own bytes in the file, which bounds them; a real set that
# compresses better than this (thousands of blank samples) reads as a stored .npz, which `neon sample` writes.
MAX_INFLATION = 100
INFLATION_FLOOR = 256 << 20


def check_inflation(what: str, decoded: int, compressed: int) -> None:
    """Refuse `what`, `compressed` bytes that decode to `decoded`, past the bound above (before decoding)."""
    if decoded > max(MAX_INFLATION * compressed, INFLATION_FLOOR):
        raise NeonError(f"{what}: {compressed} compressed bytes that decode to {decoded}, more than {MAX_INFLATION} "
                        "times as many (a decompression bomb; real images do not compress so well)")


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
        with paths.open_input(path, ".npy file") as f:
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


def read_npz(path: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
             max_bytes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The named arrays of an `.npz` (missing `required` ones refused), each header checked first, and so are the
    bytes they decode to: at most `max_bytes[name]` per array where given, and within `check_inflation` together."""
    path = paths.input_file(os.fspath(path), ".npz file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            missing = [n for n in required if n not in names]
            if missing:
                raise NeonError(f"{path}: expected arrays {' and '.join(map(repr, required))}, found "
                                f"{sorted(names) or 'none'}")
            members = [npy_member(path, zf, n) for n in (*required, *optional) if n in names]
            for m in members:
                limit = (max_bytes or {}).get(m.name)
                if limit is not None and m.nbytes > limit:
                    raise NeonError(f"{path}: array {m.name!r} declares {m.shape} {m.dtype} ({m.nbytes} bytes), "
                                    f"more than such an array holds (at most {limit})")
            check_members_inflation(path, members)
            return {m.name: read_member(path, zf, m) for m in members}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise NeonError(f"{path}: not a readable .npz ({e})") from None


def check_members_inflation(path: str, members: list[NpyMember]) -> None:
    """The compressed members about to be read, together, within `check_inflation` (each alone is within deflate's
    own limit, but two 1000-fold members of a 1 MB file still decode to 2 GB)."""
    packed = [m for m in members if m.info.compress_type != zipfile.ZIP_STORED]
    if packed:
        check_inflation(f"{path}: array{'s' * (len(packed) > 1)} {', '.join(repr(m.name) for m in packed)}",
                        sum(m.info.file_size for m in packed), sum(m.info.compress_size for m in packed))


class NpzImages:
    """An ADM-style `.npz` read lazily: `len(s)`, `s.labels`, `s.seeds`, `s.read(i, j)` -> uint8 (j-i, H, W, C),
    `s.take(indices)`. A stored (uncompressed) `arr_0` — what this project writes, and np.savez — is
    memory-mapped, so a rank touches only the images it reads; a compressed one is read whole once."""

    def __init__(self, path: str):
        path = paths.input_file(os.fspath(path), "image set")
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
                check_members_inflation(path, [images, *extra.values()])
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


def _label_table(meta: str) -> dict[str, int]:
    """An EDM-style dataset.json's labels: {"labels": [[relative path, class], ...]} -> {path: class}; anything
    else is refused in one line naming the file."""
    try:
        with paths.open_input(meta, "dataset.json") as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:
        raise NeonError(f"{meta}: not JSON ({type(e).__name__})") from None
    rows = doc.get("labels") if isinstance(doc, dict) else None
    if rows is None:
        return {}
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                                             and type(r[1]) is int and r[1] >= 0 for r in rows):
        raise NeonError(f"{meta}: 'labels' must be a list of [file name, class] pairs with classes 0, 1, ...")
    return {name.replace("\\", "/"): label for name, label in rows}


class FolderImages:
    """A folder of PNG/JPEG images (sorted by relative path), with labels from an EDM-style `dataset.json`
    ({"labels": [[relative path, label], ...]}) when present; same reading methods as NpzImages.

    Every image's header is read when the folder is opened, nothing decoded: a file that is no regular file or no
    readable image is refused by name, and so is a folder whose images decode to more than `check_inflation`
    allows (a few hundred KB of PNGs of blank 9000x9000 images would take gigabytes)."""

    def __init__(self, folder: str):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise NeonError(f"{folder}: image folder not found")
        self.path = folder
        self.files = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                            for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise NeonError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images found")
        headers = [_image_header(os.path.join(folder, f)) for f in self.files]
        self.shapes = [shape for shape, _ in headers]
        check_inflation(f"{folder}: {len(self.files)} images", sum(math.prod(shape) for shape in self.shapes),
                        sum(size for _, size in headers))
        self.seeds = None
        self.labels = None
        meta = os.path.join(folder, "dataset.json")
        if os.path.lexists(meta):
            table = _label_table(meta)
            missing = [f for f in self.files if f not in table]
            if missing:
                raise NeonError(f"{meta}: no label for {missing[0]}")
            self.labels = np.array([table[f] for f in self.files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices) -> np.ndarray:
        indices = list(indices)
        if len({self.shapes[i] for i in indices}) > 1:   # known from the headers: refused before decoding
            raise NeonError(f"{self.path}: images of different sizes in one batch; resize them to one size first")
        images = [_read_image(os.path.join(self.path, self.files[i])) for i in indices]
        return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.take(range(start, min(stop, len(self))))


def _channels(mode: str) -> int:
    """Channels `_read_image` gives an image of PIL mode `mode`: grey stays grey, everything else is RGB."""
    return 1 if mode in ("1", "L") else 3


def _image_header(path: str) -> tuple[tuple[int, int, int], int]:
    """((H, W, C) the image decodes to, its size on disk), from its header alone."""
    from PIL import Image
    with paths.open_input(path, "image") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            with Image.open(f) as im:
                (w, h), mode = im.size, im.mode
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise NeonError(f"{path}: not a readable image ({e})") from None
    if mode.startswith("I"):   # 16/32-bit: PIL's convert would clip every value above 255 to white
        raise NeonError(f"{path}: a {mode} image (more than 8 bits per channel); save it as 8-bit first")
    return (h, w, _channels(mode)), size


def _read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 1) for a grey image, (H, W, 3) otherwise; a file that does not decode is one line naming it."""
    from PIL import Image
    with paths.open_input(path, "image") as f:
        try:
            with Image.open(f) as im:
                if im.mode.startswith("I"):   # see _image_header
                    raise NeonError(f"{path}: a {im.mode} image (more than 8 bits per channel); save it as 8-bit "
                                    "first")
                return np.asarray(im.convert("L" if _channels(im.mode) == 1 else "RGB")).reshape(
                    im.size[1], im.size[0], -1)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise NeonError(f"{path}: not a readable image ({e})") from None


def open_images(path: str) -> NpzImages | FolderImages:
    """An image set on disk: an ADM-style `.npz` or a folder of images."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return FolderImages(path)
    if not os.path.lexists(path):
        raise NeonError(f"image set not found: {path}")
    paths.input_file(path, "image set (.npz or folder)")
    if path.endswith(".npz"):
        return NpzImages(path)
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
