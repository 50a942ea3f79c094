"""Reading pickled checkpoints without executing anything from the file.

The EDM and IMM releases are pickles of `torch_utils.persistence` objects: each one carries the source code of
its module and, loaded the official way, runs it (`exec(module_src)`). So can any pickle: a global such as
`os.system` in the stream is called while loading. Here every global the stream names is looked up in a short
allow-list; persistent objects and torch/timm modules become inert `Record`s holding their pickled state, and
everything else is refused before it can run.

Two ways to read storages:
- eager: nested legacy `torch.save` streams (`torch.storage._load_from_bytes`) are read with
  `torch.load(weights_only=True)`, and tensors are real tensors;
- lazy: storages become `BlobRef`s (where their bytes lie in the file) and tensors `TensorRef`s, so a merge can
  stream a checkpoint tensor by tensor (see `neon/checkpoint.py`).

Embedded source: a persistent record keeps the hash of its `module_src`, and the unpickler appends every record
to a list as it builds it (`load(..., records=)`); `check_sources` checks that list. The official loader runs
the source of each record it constructs, wherever the record ends up: a dict key, a set, a module's constructor
arguments, an attribute of an OrderedDict, or nowhere (built, then popped). A walk of the loaded object would
have to know every such place; the list, filled by the one constructor, cannot miss one.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO

import torch

from neon import paths
from neon.errors import NeonError

# The first bytes of a legacy (non-zip) torch.save stream: the pickled magic number, protocol 2.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)

# Module prefixes whose classes may appear by reference (pickled torch.nn / timm modules inside IMM's DiT).
_MODULE_PREFIXES = ("torch.nn.modules.", "timm.layers.", "timm.models.")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Refused(pickle.UnpicklingError):
    """The stream is a pickle, but asks for something this reader does not allow or that does not add up."""


class Record:
    """An object rebuilt as data: `kind` ('persistent', 'module' or 'object'), `name` (class name or dotted
    path), constructor `args`, pickled `state`, and for a persistent record the normalised hash of its embedded
    `source` (see `source_sha256`). Nothing of the original class is imported or run."""
    source: str | None = None

    def __init__(self, kind: str = "object", name: str = "", args: tuple = (), state: Any = None):
        self.kind, self.name, self.args, self.state = kind, name, args, state

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Record({self.kind}, {self.name})"


def _stand_in(path: str) -> type:
    """A class standing in for `path`: NEWOBJ/REDUCE build a Record, BUILD stores the state."""

    def new(cls, *args, **kwargs):
        return Record("module", path, args)

    return type(path.rsplit(".", 1)[-1], (Record,), {"__new__": new, "__init__": lambda self, *a, **k: None})


def _reconstruct_persistent_obj(records: list[Record], meta: dict) -> Record:
    # torch_utils.persistence: meta = {type, version, module_src, class_name, state}. module_src is never run;
    # only its hash is kept, for `check_sources`. Every record is also appended to `records` as it is made: the
    # official loader runs the source of each one the stream builds, wherever it then sits or if it is dropped.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise Refused("unexpected torch_utils.persistence record")
    record = Record("persistent", str(meta.get("class_name")), (), meta.get("state"))
    record.source = source_sha256(meta.get("module_src"))
    records.append(record)
    return record


# ---- embedded source ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _normalised_sha256(text: str) -> str | None:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    if all(not line.strip() or line.lstrip().startswith("#") for line in lines):
        return None  # no code at all: it defines nothing, so nothing can differ from our definition
    return hashlib.sha256(("\n".join(lines).rstrip("\n") + "\n").encode("utf-8")).hexdigest()


def source_sha256(text: Any) -> str | None:
    """SHA-256 of a module's source with line endings, trailing whitespace and trailing blank lines normalised
    (a checkout's CRLF or an editor's stripped spaces do not change what runs); None for source with no code
    (comments only, as in files whose source was stripped), '?' when it is not text."""
    return _normalised_sha256(text) if isinstance(text, str) else "?"


def check_sources(records: Iterable[Record], known: Mapping[str, str], path: str, trust: bool = False,
                  why: str = "a modified network would be rebuilt here from the official code") -> None:
    """Refuse a pickle whose classes carry source other than the `known` releases' (hash -> where it is from).
    records: every persistence record the unpickler built (`load(..., records=)`), so no place in the object
    graph, nor a record the stream builds and drops, escapes the check. why: what unknown source would cause.
    trust=True (the CLI's --trust-architecture) accepts it, with a warning."""
    unknown: dict[str, str] = {}
    for record in records:
        if record.source is not None and record.source not in known:
            unknown.setdefault(record.name, record.source)
    if not unknown:
        return
    names = ", ".join(unknown)
    digest = next(iter(unknown.values()))[:16]
    if not trust:
        raise NeonError(f"{path}: the embedded source of {names} (sha256 {digest}...) is not an official release's; "
                        f"{why}. Pass --trust-architecture (load arg trust_architecture=true) to load it anyway")
    print(f"warning: {path}: {names} carry unrecognised source (sha256 {digest}...), accepted as "
          f"--trust-architecture asks, though {why}", file=sys.stderr)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    if not isinstance(data, (torch.Tensor, TensorRef)):
        raise Refused(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


class _NumpyDtype(Record):
    """numpy.dtype(*args) as pickled: REDUCE, then BUILD with the dtype's state. The dtype itself is a cached
    singleton that a BUILD would rewrite for the whole process, so the state is only compared with its own."""

    def __init__(self, *args):
        import numpy as np
        super().__init__("object", "numpy.dtype", args)
        self.dtype = np.dtype(*args)
        if self.dtype.hasobject:
            raise Refused("refusing numpy object dtype")

    def __setstate__(self, state):
        if state != self.dtype.__reduce__()[2]:
            raise Refused(f"numpy dtype {self.dtype} with a state that is not its own")


def _numpy_scalar(dtype, data=None):
    import numpy as np
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise Refused("refusing a numpy scalar that is not plain numeric data")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


@dataclasses.dataclass
class BlobRef:
    """A storage whose bytes are `nbytes` bytes at `offset` in the checkpoint file (lazy mode)."""
    index: int
    dtype: torch.dtype
    numel: int
    offset: int = -1        # file offset of the raw data; filled in by `locate_blobs`

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass
class TensorRef:
    """A tensor not yet read: a view (`offset`, `shape`, `stride` in elements) into `storage`."""
    storage: Any            # BlobRef, or the record name of a .pth storage
    dtype: torch.dtype
    offset: int
    shape: tuple
    stride: tuple


def _int_tuple(v, what: str) -> tuple:
    if not isinstance(v, (tuple, list, torch.Size)) or not all(type(i) is int and i >= 0 for i in v):
        raise Refused(f"tensor {what} {v!r} is not a tuple of non-negative integers")
    return tuple(v)


def view_extent(offset: int, shape: tuple, stride: tuple) -> int:
    """Elements of storage a strided view needs: one past its last element (0 for an empty view)."""
    if 0 in shape:
        return 0
    return offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1


def _rebuild_tensor_ref(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                        metadata=None):
    """A tensor view into a storage, checked to lie inside it before anything reads or allocates."""
    size, stride = _int_tuple(size, "shape"), _int_tuple(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0 or len(size) != len(stride):
        raise Refused(f"bad tensor view (offset {storage_offset!r}, shape {size}, stride {stride})")
    if isinstance(storage, BlobRef):
        numel = storage.numel
    elif isinstance(storage, torch.storage.TypedStorage):
        numel = storage._size()
    else:
        raise Refused(f"tensor storage is a {type(storage).__name__}, not a storage")
    if view_extent(storage_offset, size, stride) > numel:
        raise Refused(f"tensor of shape {size} at offset {storage_offset} reaches past the end of "
                                     f"its storage ({numel} elements)")
    if isinstance(storage, BlobRef):
        return TensorRef(storage, storage.dtype, storage_offset, size, stride)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False,
                                           collections.OrderedDict())


# The one allow-list: dotted name -> what it becomes. Callables that build data only (no I/O, no imports).
def _allowed(storages: Callable) -> dict[str, Any]:
    return {
        "collections.OrderedDict": collections.OrderedDict,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_ref,
        "torch.storage._load_from_bytes": storages,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "numpy.dtype": _NumpyDtype,
        "numpy.core.multiarray.scalar": _numpy_scalar,
        "numpy._core.multiarray.scalar": _numpy_scalar,
        "argparse.Namespace": _NAMESPACE,
    }


_NAMESPACE = _stand_in("argparse.Namespace")  # upstream training checkpoints' 'args': a plain record
_PERSISTENT = "torch_utils.persistence._reconstruct_persistent_obj"


class _BoundedFile:
    """A file whose reads may not ask for more bytes than it has left: a length field claiming terabytes
    (BINBYTES8, FRAME, LONG4, ...) is refused before anything is allocated."""

    def __init__(self, f: BinaryIO):
        self.f = f
        here = f.tell()
        self.size = f.seek(0, io.SEEK_END)
        f.seek(here)

    def _check(self, n: int) -> None:
        left = self.size - self.f.tell()
        if n is not None and n > left:
            raise Refused(f"a length field claims {n} bytes, only {left} remain")

    def read(self, n: int = -1) -> bytes:
        self._check(n)
        return self.f.read(n)

    def readinto(self, b) -> int:
        self._check(len(b))
        return self.f.readinto(b)

    def readline(self) -> bytes:
        return self.f.readline(1 << 20)


class SafeUnpickler(pickle._Unpickler):
    """Python's unpickler with globals from one allow-list (plus `extra` names and `prefixes` whose classes
    become inert `Record`s); anything else raises UnpicklingError. The pure-Python unpickler, so that opcodes
    can be checked too: BUILD may set state only on a `Record` (not on an allowed function's `__defaults__`,
    a cached numpy dtype or a `TensorRef` already validated), and EXT opcodes are refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, lazy: bool = False, persistent_load: Callable | None = None,
                 extra: dict[str, Any] | None = None, prefixes: tuple[str, ...] = (),
                 blobs: list[BlobRef] | None = None, records: list[Record] | None = None):
        super().__init__(_BoundedFile(file))
        self.blobs: list[BlobRef] = [] if blobs is None else blobs
        # Every torch_utils.persistence record built, here and in nested storage streams (for check_sources).
        self.records: list[Record] = [] if records is None else records
        # Not a bound method: the pickle memo keeps every global it returns, and a reference back to the
        # unpickler would make a cycle that keeps the memo (every storage's bytes) alive until a gc pass.
        # The persistence constructor goes in last: no `extra` name may replace the one that records.
        storages = functools.partial(_load_from_bytes, self.blobs, self.records, lazy)
        self._allowed = {**_allowed(storages), **(extra or {}),
                         _PERSISTENT: functools.partial(_reconstruct_persistent_obj, self.records)}
        self._prefixes = _MODULE_PREFIXES + tuple(prefixes)
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        path = f"{module}.{name}"
        if path in self._allowed:
            return self._allowed[path]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # only ever used as a storage-type tag in persistent ids
        if module.startswith(self._prefixes) and _IDENTIFIER.match(name):
            return _stand_in(path)
        raise Refused(f"refusing to load global '{path}' (not on the allow-list)")

    def load_build(self):
        state, inst = self.stack.pop(), self.stack[-1]
        if type(inst) is collections.OrderedDict and isinstance(state, dict) and all(type(k) is str for k in state):
            inst.__dict__.update(state)  # a state dict's `_metadata`: attributes of a fresh dict, nothing more
        elif isinstance(inst, Record):
            inst.__setstate__(state)
        else:
            raise Refused(f"refusing to set state on a {type(inst).__name__}")
    dispatch[pickle.BUILD[0]] = load_build

    def load_ext(self):
        raise Refused("refusing an EXT opcode (extension registry lookup)")
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = load_ext
    del _op


def _load_from_bytes(blobs: list[BlobRef], records: list[Record], lazy: bool, b: bytes):
    """A storage pickled as a nested legacy torch.save stream: read it (eager), or note where it is (lazy)."""
    if not isinstance(b, bytes) or not b.startswith(LEGACY_MAGIC):
        raise Refused("storage is not a torch.save byte stream")
    if not lazy:
        return torch.load(io.BytesIO(b), weights_only=True)
    dtype, numel = _legacy_storage_header(b, records)
    blobs.append(BlobRef(len(blobs), dtype, numel))
    return blobs[-1]


def _legacy_storage_header(b: bytes, records: list[Record]) -> tuple[torch.dtype, int]:
    """(dtype, numel) of the one storage in a legacy torch.save stream, reading only its small header. Records
    its pickles build go to `records` (the official loader would run their source too)."""
    tags = []

    def persistent_load(pid):
        tags.append(pid)
        return None

    f = io.BytesIO(b)
    for _ in range(3):  # magic number, protocol version, sys_info
        SafeUnpickler(f, records=records).load()
    SafeUnpickler(f, persistent_load=persistent_load, records=records).load()
    SafeUnpickler(f, records=records).load()  # the key list
    if len(tags) != 1 or tags[0][0] != "storage":
        raise Refused("unexpected legacy storage stream")
    _, storage_type, _, _, numel, view = tags[0]
    if view is not None or storage_type not in _STORAGE_DTYPES:
        raise Refused(f"unsupported legacy storage {storage_type!r}")
    (count,) = struct.unpack("<q", f.read(8))
    dtype = _STORAGE_DTYPES[storage_type]
    if count != numel or len(b) - f.tell() != numel * torch.empty((), dtype=dtype).element_size():
        raise Refused("legacy storage stream has an unexpected length")
    return dtype, numel


def locate_blobs(path: str, blobs: list[BlobRef]) -> None:
    """Fill in the file offset of every lazily read storage.

    Storages are read in stream order, once each (later uses hit the pickle memo), so the k-th legacy byte
    string in the stream is blob k; its raw data is the last `nbytes` bytes of that string.
    """
    width = {"SHORT_BINBYTES": 1, "BINBYTES": 4, "BINBYTES8": 8}
    k = 0
    with open(path, "rb") as f:
        for op, arg, pos in pickletools.genops(f):
            if op.name in width and isinstance(arg, bytes) and arg.startswith(LEGACY_MAGIC):
                if k >= len(blobs):
                    raise NeonError(f"{path}: more storages in the stream than were loaded")
                blobs[k].offset = pos + 1 + width[op.name] + len(arg) - blobs[k].nbytes
                k += 1
    if k != len(blobs):
        raise NeonError(f"{path}: found {k} storages in the stream, expected {len(blobs)}")


def unpickle(data: BinaryIO, where: str, **kwargs) -> Any:
    """`SafeUnpickler(data, **kwargs).load()`; any failure is one NeonError line naming `where`."""
    try:
        return SafeUnpickler(data, **kwargs).load()
    except NeonError:
        raise
    except Refused as e:
        raise NeonError(f"{where}: {e}") from None
    except pickle.UnpicklingError as e:
        raise NeonError(f"{where}: not a readable pickle ({e})") from None
    except (EOFError, struct.error) as e:
        raise NeonError(f"{where}: truncated or not a pickle ({e})") from None
    except Exception as e:  # a malformed stream: stack underflow, a bad memo index, wrong argument types...
        raise NeonError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


def load(path: str, lazy: bool = False, records: list[Record] | None = None) -> Any:
    """Unpickle `path` with the allow-list. lazy=True: tensors are `TensorRef`s into the file. records: a list
    that receives every torch_utils.persistence record built while reading (for `check_sources`)."""
    blobs: list[BlobRef] = []
    with paths.open_input(path, "pickle") as f:
        obj = unpickle(f, path, lazy=lazy, blobs=blobs, records=records)
    if lazy:
        locate_blobs(path, blobs)
    return obj


_RECORD_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def storage_ref(pid) -> BlobRef:
    """A torch zip archive's persistent id ('storage', storage type, key, location, numel) -> a BlobRef whose
    index is the record key (the storage's bytes are the archive's `data/<key>`), every field checked."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise Refused(f"unexpected persistent id {str(pid)[:80]!r}")
    _, storage_type, key, location, numel = pid
    dtype = _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None
    if dtype is None:
        raise Refused(f"unsupported storage type {str(storage_type)[:40]!r}")
    if not isinstance(key, str) or not _RECORD_KEY.match(key) or not isinstance(location, str):
        raise Refused(f"bad storage key or location in persistent id {str(pid)[:80]!r}")
    if type(numel) is not int or numel < 0:
        raise Refused(f"bad storage size {numel!r} in persistent id")
    return BlobRef(index=key, dtype=dtype, numel=numel)


# TorchScript archives (torch.jit.save): data.pkl pickles each module as `__torch__.<class>` with its
# attributes as state; these helpers rebuild plain lists. The archive's code/ folder is never read.
def _plain_list(kind: type) -> Callable:
    def build(items):
        if not isinstance(items, list) or not all(isinstance(i, kind) for i in items):
            raise Refused(f"a TorchScript {kind.__name__} list holds other things")
        return items
    return build


TORCHSCRIPT_NAMES = {
    "torch.jit._pickle.build_intlist": _plain_list(int),
    "torch.jit._pickle.build_doublelist": _plain_list(float),
    "torch.jit._pickle.build_boollist": _plain_list(bool),
    "torch.jit._pickle.build_tensorlist": _plain_list(TensorRef),
    "torch.jit._pickle.restore_type_tag": lambda value, type_str=None: value,
}


def read_torchscript(data: bytes, where: str) -> Any:
    """The module tree pickled in a TorchScript archive's data.pkl (modules are `Record`s, tensors real CPU
    tensors read from `data/<key>`), without compiling or running anything the archive holds."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        roots = [n[:-len("data.pkl")] for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    except (zipfile.BadZipFile, ValueError) as e:
        raise NeonError(f"{where}: not a readable zip archive ({e})") from None
    if len(roots) != 1:
        raise NeonError(f"{where}: expected one <root>/data.pkl in the archive, found {len(roots)}")

    def record(name: str, nbytes: int | None = None) -> bytes:
        try:
            info = zf.getinfo(roots[0] + name)
        except KeyError:
            raise NeonError(f"{where}: the archive has no record {name}") from None
        if info.compress_type != zipfile.ZIP_STORED:  # torch stores every record; nothing to decompress
            raise NeonError(f"{where}: record {name} is compressed, which torch never writes")
        if nbytes is not None and info.file_size != nbytes:
            raise NeonError(f"{where}: record {name} holds {info.file_size} bytes, its tensor claims {nbytes}")
        return zf.read(info)

    obj = unpickle(io.BytesIO(record("data.pkl")), f"{where} (data.pkl)", persistent_load=storage_ref,
                   extra=TORCHSCRIPT_NAMES, prefixes=("__torch__.",))
    storages: dict[str, torch.Tensor] = {}

    def tensor(ref: TensorRef) -> torch.Tensor:
        blob = ref.storage
        if blob.index not in storages:
            raw = bytearray(record(f"data/{blob.index}", blob.nbytes))
            storages[blob.index] = torch.frombuffer(raw, dtype=blob.dtype) if raw else torch.empty(0, dtype=blob.dtype)
        return storages[blob.index].as_strided(ref.shape, ref.stride, ref.offset)

    return map_tensors(obj, tensor)


def map_tensors(obj: Any, fn: Callable, seen: set | None = None) -> Any:
    """`obj` with every TensorRef t replaced by fn(t), inside dicts, lists, tuples and Records' state."""
    seen = set() if seen is None else seen
    if isinstance(obj, TensorRef):
        return fn(obj)
    if id(obj) in seen:
        return obj
    if isinstance(obj, Record):
        seen.add(id(obj))
        obj.state = map_tensors(obj.state, fn, seen)
    elif isinstance(obj, dict):
        seen.add(id(obj))
        for k in list(obj):
            obj[k] = map_tensors(obj[k], fn, seen)
    elif isinstance(obj, list):
        seen.add(id(obj))
        obj[:] = [map_tensors(v, fn, seen) for v in obj]
    elif isinstance(obj, tuple):
        return type(obj)(map_tensors(v, fn, seen) for v in obj) if type(obj) is tuple else obj
    return obj


def module_state_dict(record: Record, prefix: str = "") -> dict[str, Any]:
    """The state_dict of a pickled module: its parameters, persistent buffers, then children, recursively —
    the order `nn.Module.state_dict()` uses."""
    state = record.state if isinstance(record, Record) else None
    if not isinstance(state, dict):
        raise NeonError(f"{record!r} does not hold module state")
    out: dict[str, Any] = {}
    for name, t in (state.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, t in (state.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, prefix + name + "."))
    return out


def init_kwargs(record: Record) -> dict[str, Any]:
    """Constructor kwargs recorded by torch_utils.persistence (`_init_kwargs`), or {}."""
    state = record.state if isinstance(record, Record) and isinstance(record.state, dict) else {}
    return dict(state.get("_init_kwargs") or {})


def child(record: Record, name: str) -> Record:
    """A sub-module of a pickled module (`record.state['_modules'][name]`)."""
    modules = (record.state or {}).get("_modules") or {}
    if name not in modules or modules[name] is None:
        raise NeonError(f"{record.name} has no sub-module {name!r}")
    return modules[name]
