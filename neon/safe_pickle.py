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
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pickle
import pickletools
import re
import struct
from typing import Any, BinaryIO, Callable

import torch

from neon.errors import NeonError

# The first bytes of a legacy (non-zip) torch.save stream: the pickled magic number, protocol 2.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)

# Module prefixes whose classes may appear by reference (pickled torch.nn / timm modules inside IMM's DiT).
_MODULE_PREFIXES = ("torch.nn.modules.", "timm.layers.", "timm.models.")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Record:
    """An object rebuilt as data: `kind` ('persistent', 'module' or 'object'), `name` (class name or dotted
    path), constructor `args`, pickled `state`. Nothing of the original class is imported or run."""

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


def _reconstruct_persistent_obj(meta: dict) -> Record:
    # torch_utils.persistence: meta = {type, version, module_src, class_name, state}. module_src is never run.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("unexpected torch_utils.persistence record")
    return Record("persistent", str(meta.get("class_name")), (), meta.get("state"))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _numpy_scalar(dtype, data=None):
    import numpy as np
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refusing a numpy scalar that is not plain numeric data")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(*args):
    import numpy as np
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing numpy object dtype")
    return dtype


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


def _rebuild_tensor_ref(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                        metadata=None):
    if isinstance(storage, BlobRef):
        return TensorRef(storage, storage.dtype, storage_offset, tuple(size), tuple(stride))
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           backward_hooks or collections.OrderedDict())


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come from an allow-list; anything else raises UnpicklingError."""

    def __init__(self, file: BinaryIO, lazy: bool = False, persistent_load: Callable | None = None):
        super().__init__(file)
        self.blobs: list[BlobRef] = []
        # Not a bound method: the pickle memo keeps every global it returns, and a reference back to the
        # unpickler would make a cycle that keeps the memo (every storage's bytes) alive until a gc pass.
        self._storages = functools.partial(_load_from_bytes, self.blobs, lazy)
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str):
        path = f"{module}.{name}"
        allowed = {
            "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
            "torch._utils._rebuild_tensor_v2": _rebuild_tensor_ref,
            "torch.storage._load_from_bytes": self._storages,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "numpy.dtype": _numpy_dtype,
            "numpy.core.multiarray.scalar": _numpy_scalar,
            "numpy._core.multiarray.scalar": _numpy_scalar,
            "argparse.Namespace": _stand_in(path),
        }
        if path in allowed:
            return allowed[path]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # only ever used as a storage-type tag in persistent ids
        if module.startswith(_MODULE_PREFIXES) and _IDENTIFIER.match(name):
            return _stand_in(path)
        raise pickle.UnpicklingError(f"refusing to load global '{path}' (not on the allow-list)")


def _load_from_bytes(blobs: list[BlobRef], lazy: bool, b: bytes):
    """A storage pickled as a nested legacy torch.save stream: read it (eager), or note where it is (lazy)."""
    if not isinstance(b, bytes) or not b.startswith(LEGACY_MAGIC):
        raise pickle.UnpicklingError("storage is not a torch.save byte stream")
    if not lazy:
        return torch.load(io.BytesIO(b), weights_only=True)
    dtype, numel = _legacy_storage_header(b)
    blobs.append(BlobRef(len(blobs), dtype, numel))
    return blobs[-1]


def _legacy_storage_header(b: bytes) -> tuple[torch.dtype, int]:
    """(dtype, numel) of the one storage in a legacy torch.save stream, reading only its small header."""
    tags = []

    def persistent_load(pid):
        tags.append(pid)
        return None

    f = io.BytesIO(b)
    for _ in range(3):  # magic number, protocol version, sys_info
        SafeUnpickler(f).load()
    SafeUnpickler(f, persistent_load=persistent_load).load()
    SafeUnpickler(f).load()  # the key list
    if len(tags) != 1 or tags[0][0] != "storage":
        raise pickle.UnpicklingError("unexpected legacy storage stream")
    _, storage_type, _, _, numel, view = tags[0]
    if view is not None or storage_type not in _STORAGE_DTYPES:
        raise pickle.UnpicklingError(f"unsupported legacy storage {storage_type!r}")
    (count,) = struct.unpack("<q", f.read(8))
    dtype = _STORAGE_DTYPES[storage_type]
    if count != numel or len(b) - f.tell() != numel * torch.empty((), dtype=dtype).element_size():
        raise pickle.UnpicklingError("legacy storage stream has an unexpected length")
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


def load(path: str, lazy: bool = False) -> Any:
    """Unpickle `path` with the allow-list. lazy=True: tensors are `TensorRef`s into the file."""
    try:
        with open(path, "rb") as f:
            unpickler = SafeUnpickler(f, lazy=lazy)
            obj = unpickler.load()
    except pickle.UnpicklingError as e:
        raise NeonError(f"{path}: {e}") from None
    except (EOFError, struct.error) as e:
        raise NeonError(f"{path}: truncated or not a pickle ({e})") from None
    if lazy:
        locate_blobs(path, unpickler.blobs)
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
