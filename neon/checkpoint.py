"""Checkpoint containers, read lazily and rewritten tensor by tensor.

Neon merges one module of a checkpoint — the EMA network where the container has one — and must keep
everything else the file holds, in the same container, so the official code loads the result. Three formats:

- `.pth` / `.pt` (torch.save zip): a plain state dict, or a dict holding `model_ema` / `ema` / `model` /
  `state_dict` / `net`; read through torch's zip reader one storage at a time;
- `.safetensors`: header + raw bytes, read with plain file reads;
- EDM/IMM pickles (`torch_utils.persistence`): read by `neon.safe_pickle` without executing anything, tensors
  located in the file; their embedded source must be a registered family's (`check_embedded_source`).

`open_checkpoint(path)` gives a `Checkpoint`: the merged module's tensors as lazy references, `read(key)` to get
one, and `write(out, replace)` to copy the whole file with each of those tensors replaced by `replace(key, t)`.
Peak memory is a few tensors, never the checkpoint.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import io
import json
import math
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch

from neon import paths, pipeline_folder, safe_pickle
from neon.containers import is_safetensors_head
from neon.errors import NeonError
from neon.registry import Registry
from neon.safe_pickle import BlobRef, Record, TensorRef

# Container keys that hold the network, in the order Neon prefers them (the EMA network first).
MODULE_KEYS = ("ema", "model_ema", "model", "state_dict", "net", "module")

# The official embedded source each family recognises (its table: normalised SHA-256 -> where it is from), found
# through the `neon.sources` entry points as families are: the core reads any family's pickles (merge inputs,
# guides, θs snapshots) without knowing which family wrote them, so it accepts the source of any of them.
SOURCES = Registry("neon.sources", "table of official embedded sources")


def known_sources() -> dict[str, str]:
    """Every registered table of official embedded source, together (hash -> where it is from)."""
    known: dict[str, str] = {}
    for name in SOURCES.names():
        known.update(SOURCES.get(name))
    return known


def check_embedded_source(records: list[Record], path: str, trust_architecture: bool = False) -> None:
    """Refuse a pickle whose persistence records carry source no registered family recognises (see
    `safe_pickle.check_sources`), unless trust_architecture. The official loader runs that source, from this
    file and from any file Neon writes as a copy of it (a merge, a self-training snapshot)."""
    if any(r.source is not None for r in records):   # the tables (their families' modules) only when needed
        safe_pickle.check_sources(records, known_sources(), path, trust_architecture,
                                  "the official loader would run it, from this file and from any copy Neon writes")


# ---------------------------------------------------------------------------------------------------------
# Atomic writes: a reader never sees a half-written file, and a killed job leaves no partial output.

def file_mode() -> int:
    """The mode open() would give a new file now: 0o666 less the process umask (0o644 under the usual 022).
    Read from /proc where Linux shows it; elsewhere set and restore, which another thread could race."""
    try:
        with open("/proc/self/status") as f:
            return 0o666 & ~next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path` (`paths.temp_path`); on success it is renamed to `path`, on error
    removed. A process killed meanwhile leaves it behind: the next write into the folder removes it."""
    path = paths.output_file(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    paths.remove_stale_temps(folder)
    tmp = paths.temp_path(path)
    fd = paths.open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # its name is predictable
    os.fchmod(fd, file_mode())  # made private first; the result is an ordinary, umask-respecting file
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """`open(path, mode)` that appears at `path` only once closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_save(obj: Any, path: str) -> None:
    """`torch.save(obj, path)`, atomically."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def cache_dir() -> str:
    """$NEON_CACHE_DIR, else $XDG_CACHE_HOME/neon, else ~/.cache/neon."""
    return os.environ.get("NEON_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "neon")


def local_path(path_or_url: str) -> str:
    """A local file for `path_or_url`: paths are returned as they are; an http(s) URL (as the official READMEs
    pass for EDM's reference statistics) is downloaded once into the cache folder."""
    if not path_or_url.startswith(("http://", "https://")):
        return path_or_url
    import urllib.request
    target = os.path.join(cache_dir(), "downloads", os.path.basename(path_or_url.split("?")[0]))
    if not os.path.isfile(target):
        print(f"downloading {path_or_url} -> {target}")
        try:
            with urllib.request.urlopen(path_or_url) as r, atomic_open(target) as f:
                shutil.copyfileobj(r, f, 16 << 20)
        except OSError as e:
            raise NeonError(f"could not download {path_or_url} ({e}); fetch it with download_models.sh "
                            "and pass the local file") from None
    return target


# ---------------------------------------------------------------------------------------------------------
# The lazy checkpoint.

def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> None:
    """Hand freed heap memory back to the OS. Streaming a checkpoint frees a few tensor-sized buffers per
    tensor; glibc keeps such blocks in its heap, and without this the resident size creeps up to the size of
    the file — the very thing streaming is for."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

def _is_tensorish(v) -> bool:
    return isinstance(v, (torch.Tensor, TensorRef))


def select_module(obj: Any, path: str) -> tuple[str | None, dict]:
    """(key, state dict) of the module Neon merges in a loaded container `obj`."""
    if isinstance(obj, dict) and obj and all(_is_tensorish(v) for v in obj.values()):
        return None, obj
    if isinstance(obj, dict):
        for key in MODULE_KEYS:
            value = obj.get(key)
            if isinstance(value, Record):
                return key, safe_pickle.module_state_dict(value)
            if isinstance(value, dict) and value and all(_is_tensorish(v) for v in value.values()):
                return key, value
    kinds = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise NeonError(f"{path}: no network state dict found (top level: {kinds}; expected a state dict or one "
                    f"of {', '.join(MODULE_KEYS)})")


@dataclasses.dataclass
class Checkpoint:
    """One checkpoint file, its merged module's tensors not yet read.

    format:     'pth', 'safetensors' or 'pickle'
    module:     container key of the merged module (None: the whole file is one state dict)
    class_name: the module's class where the file records it (EDM/IMM pickles), else None
    tensors:    key -> TensorRef, in state-dict order
    """
    path: str
    format: str
    module: str | None
    class_name: str | None
    tensors: dict[str, TensorRef]
    _reader: Any = None

    def describe(self) -> str:
        inner = f"['{self.module}']" if self.module else ""
        kind = f" {self.class_name}" if self.class_name else ""
        return f"{self.format}{inner}{kind}"

    # -- reading ------------------------------------------------------------------------------------------
    def _storage_bytes(self, storage) -> torch.Tensor:
        """The raw bytes of one storage, as a fresh uint8 tensor (one copy out of the file)."""
        if self.format == "pth":
            name = f"data/{storage}"
            nbytes = self._zip().get_record_size(name)
            raw = self._zip().get_storage_from_record(name, nbytes, torch.uint8).untyped_storage()
            return torch.empty(0, dtype=torch.uint8).set_(raw, 0, (nbytes,))
        with open(self.path, "rb") as f:  # pickle BlobRef, or safetensors (offset, nbytes)
            offset, nbytes = (storage.offset, storage.nbytes) if isinstance(storage, BlobRef) else storage
            f.seek(offset)
            data = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes and f.readinto(data.numpy()) != nbytes:
                raise NeonError(f"{self.path}: file is truncated")
            return data

    def _zip(self):
        if self._reader is None:
            self._reader = torch._C.PyTorchFileReader(self.path)
        return self._reader

    def _view(self, ref: TensorRef, data: torch.Tensor) -> torch.Tensor:
        flat = data.view(ref.dtype) if data.numel() else torch.empty(0, dtype=ref.dtype)
        return flat.as_strided(ref.shape, ref.stride, ref.offset)

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` of the merged module, read from disk (a fresh CPU tensor)."""
        ref = self.tensors[key]
        return self._view(ref, self._storage_bytes(ref.storage)).clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.read(k) for k in self.tensors}

    # -- writing ------------------------------------------------------------------------------------------
    def _groups(self) -> dict[Any, list[str]]:
        """Storage -> the merged-module keys that view it (usually one key per storage)."""
        groups: dict[Any, list[str]] = {}
        for key, ref in self.tensors.items():
            sid = ref.storage.index if isinstance(ref.storage, BlobRef) else ref.storage
            groups.setdefault(sid, []).append(key)
        return groups

    def _patched(self, keys: list[str], data: torch.Tensor, replace: Callable) -> torch.Tensor:
        for key in keys:
            ref = self.tensors[key]
            new = replace(key, self._view(ref, data))
            if tuple(new.shape) != tuple(ref.shape):
                raise NeonError(f"replacement for {key!r} has shape {tuple(new.shape)}, expected {ref.shape}")
            self._view(ref, data).copy_(new.to(ref.dtype))
        return data

    def write(self, out: str, replace: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        """Copy this checkpoint to `out` (atomically), replacing each merged-module tensor t by replace(key, t)
        (cast to the stored dtype; `replace` must not modify t in place). Everything else in the file is copied
        as it is."""
        with atomic_path(out) as tmp:
            {"pth": self._write_pth, "safetensors": self._write_safetensors,
             "pickle": self._write_pickle}[self.format](tmp, replace)

    def _write_pickle(self, tmp: str, replace) -> None:
        # Same-length byte substitution inside the nested storage streams: every opcode, memo index and
        # byte of embedded source stays where it was, so the official unpickler reads the result as before.
        shutil.copyfile(self.path, tmp)
        with open(tmp, "r+b") as f:
            for keys in self._groups().values():
                blob = self.tensors[keys[0]].storage
                data = self._patched(keys, self._storage_bytes(blob), replace)
                f.seek(blob.offset)
                f.write(data.numpy())
                del data
                release_memory()

    def _write_safetensors(self, tmp: str, replace) -> None:
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            (n,) = struct.unpack("<Q", src.read(8))
            dst.write(struct.pack("<Q", n) + src.read(n))
            for key in sorted(self.tensors, key=lambda k: self.tensors[k].storage[0]):
                dst.write(self._patched([key], self._storage_bytes(self.tensors[key].storage), replace).numpy())
                release_memory()

    def _write_pth(self, tmp: str, replace) -> None:
        reader = self._zip()
        groups = self._groups()
        with open(tmp, "wb") as f:
            writer = torch._C.PyTorchFileWriter(f)
            try:
                for name in reader.get_all_records():
                    if name in ("version", ".data/serialization_id"):
                        continue  # written by write_end_of_file
                    sid = name[len("data/"):] if name.startswith("data/") else None
                    if sid in groups:
                        data = self._patched(groups[sid], self._storage_bytes(sid), replace)
                        writer.write_record(name, data.untyped_storage(), data.numel())
                    else:
                        data = reader.get_record(name)
                        writer.write_record(name, data, len(data))
                    del data
                    release_memory()
                writer.write_end_of_file()
            finally:
                # The writer finishes the file when it is destroyed: while `f` is still open, also when `replace`
                # refused a tensor (else it writes to a closed file and aborts the process). The temporary file
                # is then discarded by atomic_path.
                del writer


def _open_pth(path: str, trust_architecture: bool = False) -> Checkpoint:
    try:
        reader = torch._C.PyTorchFileReader(path)
    except RuntimeError:
        raise NeonError(f"{path}: not a torch.save zip file (legacy or corrupt checkpoint)") from None
    obj = read_pth_object(path, reader, trust_architecture)
    module, sd = select_module(obj, path)
    tensors = {}
    for k, ref in sd.items():
        if not isinstance(ref, TensorRef):
            raise NeonError(f"{path}: entry {k!r} is not a tensor")
        tensors[k] = dataclasses.replace(ref, storage=ref.storage.index)  # the record key 'data/<key>'
    return Checkpoint(path, "pth", module, None, tensors, reader)


def read_pth_object(path: str, reader=None, trust_architecture: bool = False) -> Any:
    """The object a torch.save zip holds, tensors as `TensorRef`s (storage: BlobRef whose index is the record
    key), read with the restricted unpickler; every storage is checked against the size of its record, and
    embedded source as `check_embedded_source` does."""
    reader = reader or torch._C.PyTorchFileReader(path)
    try:
        data = reader.get_record("data.pkl")
    except RuntimeError:
        raise NeonError(f"{path}: a zip without data.pkl (not a torch.save checkpoint)") from None
    blobs: dict[str, BlobRef] = {}

    def persistent_load(pid):
        blob = safe_pickle.storage_ref(pid)
        return blobs.setdefault(blob.index, blob)

    persistent: list[Record] = []
    obj = safe_pickle.unpickle(io.BytesIO(data), path, persistent_load=persistent_load, records=persistent)
    check_embedded_source(persistent, path, trust_architecture)
    records = set(reader.get_all_records())
    for key, blob in blobs.items():
        if f"data/{key}" not in records:
            raise NeonError(f"{path}: storage {key} has no record data/{key}")
        size = reader.get_record_size(f"data/{key}")
        if size > os.path.getsize(path):
            raise NeonError(f"{path}: record data/{key} claims {size} bytes, more than the whole file")
        if size != blob.nbytes:
            raise NeonError(f"{path}: storage {key} claims {blob.nbytes} bytes, its record holds {size}")
    return obj


def read_pth(path: str, trust_architecture: bool = False) -> Any:
    """A whole torch.save zip (e.g. an upstream training checkpoint with 'args': argparse.Namespace) read with
    the restricted unpickler: tensors are real CPU tensors, other objects plain data or inert `Record`s."""
    reader = torch._C.PyTorchFileReader(path)
    obj = read_pth_object(path, reader, trust_architecture)
    storages: dict[str, torch.Tensor] = {}

    def tensor(ref: TensorRef) -> torch.Tensor:
        key = ref.storage.index
        if key not in storages:
            nbytes = reader.get_record_size(f"data/{key}")
            raw = reader.get_storage_from_record(f"data/{key}", nbytes, torch.uint8).untyped_storage()
            flat = torch.empty(0, dtype=torch.uint8).set_(raw, 0, (nbytes,))
            storages[key] = flat.view(ref.dtype) if nbytes else torch.empty(0, dtype=ref.dtype)
        return storages[key].as_strided(ref.shape, ref.stride, ref.offset)

    return safe_pickle.map_tensors(obj, tensor)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _open_safetensors(path: str) -> Checkpoint:
    with paths.open_input(path, "safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise NeonError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise NeonError(f"{path}: safetensors header claims {n} bytes, the file has {size - 8} after its length")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise NeonError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise NeonError(f"{path}: safetensors header is a {type(header).__name__}, not a JSON object")
    tensors = {key: _safetensors_entry(path, key, info, 8 + n) for key, info in header.items() if key != "__metadata__"}
    _check_ranges(path, tensors, size)
    return Checkpoint(path, "safetensors", None, None, tensors)


def _safetensors_entry(path: str, key: str, info: Any, data_start: int) -> TensorRef:
    """One header entry as a TensorRef whose storage is (file offset, nbytes), every field checked."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise NeonError(f"{where}: header entry needs dtype, shape and data_offsets")
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise NeonError(f"{where}: unsupported dtype {str(info['dtype'])[:20]}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise NeonError(f"{where}: shape {str(shape)[:40]} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise NeonError(f"{where}: data_offsets {str(offsets)[:40]} is not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise NeonError(f"{where}: data_offsets end {end} < begin {begin}")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes:
        raise NeonError(f"{where}: data_offsets span {end - begin} bytes, shape {tuple(shape)} {info['dtype']} needs "
                        f"{nbytes}")
    stride = tuple(torch.empty(shape, device="meta").stride())
    return TensorRef((data_start + begin, end - begin), dtype, 0, tuple(shape), stride)


def _check_ranges(path: str, tensors: dict[str, TensorRef], file_size: int) -> None:
    """Every tensor's bytes inside the file, no two overlapping (a merge would write one over the other)."""
    spans = sorted((ref.storage[0], ref.storage[0] + ref.storage[1], key) for key, ref in tensors.items())
    previous_end, previous = 0, None
    for begin, end, key in spans:
        if end > file_size:
            raise NeonError(f"{path}: tensor {key!r} ends at byte {end}, past the end of the file ({file_size})")
        if begin < previous_end and end > begin:
            raise NeonError(f"{path}: tensors {previous!r} and {key!r} overlap in the file")
        if end > begin:
            previous_end, previous = end, key


def _open_pickle(path: str, trust_architecture: bool = False) -> Checkpoint:
    records: list[Record] = []
    obj = safe_pickle.load(path, lazy=True, records=records)  # its memo holds every storage's bytes until it returns
    release_memory()
    check_embedded_source(records, path, trust_architecture)
    module, sd = select_module(obj, path)
    class_name = obj[module].name if module and isinstance(obj.get(module), Record) else None
    return Checkpoint(path, "pickle", module, class_name, dict(sd))


def detect_format(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if zipfile.is_zipfile(path):
        return "pth"
    # safetensors first: its 8-byte header length can begin with the byte 0x80 that opens a pickle (one header
    # length in 256), but its JSON header then opens with "{", and no pickle holds both.
    if is_safetensors_head(head, os.path.getsize(path)):
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if path.endswith(".safetensors"):
        return "safetensors"
    raise NeonError(f"{path}: unknown checkpoint format")


def open_checkpoint(path: str, trust_architecture: bool = False) -> Checkpoint:
    """Open a checkpoint lazily (no tensor is read); a diffusers pipeline folder opens as its network. A pickle
    carrying embedded source that no registered family recognises is refused unless trust_architecture
    (`check_embedded_source`)."""
    path = os.fspath(path)
    if pipeline_folder.is_pipeline_folder(path):   # one safetensors reader for files and folders
        return pipeline_folder.open_pipeline_folder(path, _open_safetensors)
    fmt = detect_format(paths.input_file(path, "checkpoint"))
    if fmt == "safetensors":
        return _open_safetensors(path)
    return {"pth": _open_pth, "pickle": _open_pickle}[fmt](path, trust_architecture)


def load_state_dict(path: str, trust_architecture: bool = False) -> dict[str, torch.Tensor]:
    """The merged module's state dict (the EMA network where the container has one), read safely; see
    `open_checkpoint` for trust_architecture."""
    return open_checkpoint(path, trust_architecture).state_dict()


def write_like(template: str, out: str, state_dict: dict[str, torch.Tensor], trust_architecture: bool = False) -> None:
    """Write `state_dict` in `template`'s container: a copy of the template with its network's tensors
    replaced (keys and shapes must match). This is how EDM/IMM pickles are saved: the official loader then
    reads the result exactly as it reads the template, embedded source included (trust_architecture: accept
    source no family recognises, as the template's loader was told to)."""
    ckpt = open_checkpoint(template, trust_architecture)
    missing = [k for k in ckpt.tensors if k not in state_dict]
    extra = [k for k in state_dict if k not in ckpt.tensors]
    if missing or extra:
        raise NeonError(f"state dict does not match {template}: missing {missing[:3]}, unexpected {extra[:3]}")
    ckpt.write(out, lambda key, _: state_dict[key].detach().cpu())


# ---------------------------------------------------------------------------------------------------------
# Strict loading into our own networks (every family's loader).

def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def check_state_dict(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], what: str,
                     any_shape: Collection[str] = ()) -> None:
    """Same keys and shapes as `expected`, else one NeonError line naming the first differences:
    '{what}: 1 missing (e.g. k); 2 unexpected (e.g. a, b); 1 shape mismatch (e.g. k has shape (7,), expected (3,))'.
    any_shape: keys whose shape the module sets itself on load."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [k for k, t in expected.items() if k in state_dict and k not in any_shape
              and tuple(state_dict[k].shape) != tuple(t.shape)]
    problems = [f"{len(missing)} missing (e.g. {_examples(missing)})"] if missing else []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatch (e.g. {k} has shape {tuple(state_dict[k].shape)}, "
                        f"expected {tuple(expected[k].shape)})")
    if problems:
        raise NeonError(f"{what}: {'; '.join(problems)}")


def load_strict(build: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor], what: str,
                any_shape: Collection[str] = ()) -> torch.nn.Module:
    """The module `build()` makes, built on the meta device (no memory, no initialisation: a DiT-XL/2 is
    neither initialised nor held twice) with `state_dict`'s tensors assigned to it. Keys and shapes must match
    (`check_state_dict`); floating tensors take the module's dtype, as a copying load_state_dict would. The
    module stays where the tensors are (the caller moves it)."""
    with torch.device("meta"):
        module = build()
    own = module.state_dict()
    check_state_dict(own, state_dict, what, any_shape)
    cast = {k: v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v
            for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta and n not in state_dict]
    if left:   # a buffer outside the state dict that the constructor did not fill
        raise NeonError(f"{what}: no weights for {_examples(left)}")
    return module


# ---------------------------------------------------------------------------------------------------------
# Unwrapping a container to its state dict (the families' readers of plain torch files).

# Prefixes that DistributedDataParallel and torch.compile put on every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of name -> tensor."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(_is_tensorish(v) for v in obj.values())


def unwrap_state_dict(obj: Any, keys: tuple[str, ...] = MODULE_KEYS, where: str = "checkpoint",
                      depth: int = 4) -> tuple[str, dict]:
    """(where it was, the state dict) of a container: the object itself when it is a state dict ('plain'), else
    the one under the first of `keys` it has, nested up to `depth` wrappers deep (e.g. 'trainer.var_wo_ddp');
    the wrapper prefixes that DDP and torch.compile add to every key are removed."""
    found: list[str] = []
    for _ in range(depth + 1):
        if is_state_dict(obj):
            sd = dict(obj)
            for prefix in WRAPPER_PREFIXES:
                if all(k.startswith(prefix) for k in sd):
                    sd = {k[len(prefix):]: v for k, v in sd.items()}
            return ".".join(found) or "plain", sd
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in keys if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        found.append(key)
        obj = obj[key]
    top = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
    raise NeonError(f"{where} holds no state dict (top level: {top}; expected name -> tensor, or one under "
                    f"{', '.join(keys)})")
