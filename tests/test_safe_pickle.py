"""The restricted unpickler (neon.safe_pickle): globals from one allow-list, state set only on its own records,
no extension registry, no length field believed, no tensor view outside its storage."""
import argparse
import copyreg
import io
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from neon import safe_pickle
from neon.errors import NeonError


def victim(x=1):
    return x


def build_on_global(module: str, name: str) -> bytes:
    """GLOBAL module.name, then BUILD with slot state {'__defaults__': (2,)}: rewrites a function's defaults."""
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}X\x0c\x00\x00\x00__defaults__K\x02\x85s\x86b.")


def test_build_cannot_rewrite_an_allowed_functions_defaults():
    pickle.loads(build_on_global(__name__, "victim"))
    assert victim() == 2                       # the stream works on an ordinary unpickler
    victim.__defaults__ = (1,)
    before = safe_pickle._rebuild_parameter.__defaults__
    with pytest.raises(NeonError, match="refusing to set state on a function"):
        safe_pickle.unpickle(io.BytesIO(build_on_global("torch._utils", "_rebuild_parameter")), "f.pkl")
    assert safe_pickle._rebuild_parameter.__defaults__ == before


class _Storage:
    def __init__(self, pid):
        self.pid = pid


class _TensorThenState:
    """Pickles as _rebuild_tensor_v2(...) followed by BUILD {'offset': ...}: moving a checked view."""

    def __init__(self, storage, shape, state):
        self.storage, self.shape, self.state = storage, shape, state

    def __reduce__(self):
        args = (self.storage, 0, self.shape, (1,), False, OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args, self.state) if self.state else \
            (torch._utils._rebuild_tensor_v2, args)


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def _stream(obj) -> io.BytesIO:
    buf = io.BytesIO()
    _PidPickler(buf, protocol=2).dump(obj)
    buf.seek(0)
    return buf


def test_a_checked_tensor_reference_cannot_be_moved_afterwards():
    pid = ("storage", torch.FloatStorage, "0", "cpu", 4)
    ok = safe_pickle.unpickle(_stream(_TensorThenState(_Storage(pid), (4,), None)), "f",
                              persistent_load=safe_pickle.storage_ref)
    assert isinstance(ok, safe_pickle.TensorRef) and ok.shape == (4,)
    with pytest.raises(NeonError, match="refusing to set state on a TensorRef"):
        safe_pickle.unpickle(_stream(_TensorThenState(_Storage(pid), (4,), {"offset": 1 << 30})), "f",
                             persistent_load=safe_pickle.storage_ref)
    with pytest.raises(NeonError, match="reaches past the end of its storage"):
        safe_pickle.unpickle(_stream(_TensorThenState(_Storage(pid), (5,), None)), "f",
                             persistent_load=safe_pickle.storage_ref)


def test_numpy_values_load_but_a_dtype_state_that_is_not_its_own_is_refused():
    data = pickle.dumps({"a": np.float32(1.5), "b": np.int64(-3)}, protocol=4)
    assert safe_pickle.unpickle(io.BytesIO(data), "f") == {"a": 1.5, "b": -3}
    forged = data.replace(b"\x8c\x01<", b"\x8c\x01>", 1)  # the float32 dtype's byte order in its state
    assert forged != data
    with pytest.raises(NeonError, match="numpy dtype float32 with a state that is not its own"):
        safe_pickle.unpickle(io.BytesIO(forged), "f")
    assert np.dtype("float32").byteorder in "=<"


def test_ext_opcodes_are_refused_even_for_registered_extensions(tmp_path):
    copyreg.add_extension(__name__, "victim", 0x7AB)
    try:
        data = pickle.dumps(victim, protocol=2)
        assert data[2] == pickle.EXT2[0]
        assert pickle.loads(data) is victim      # the registry hands an ordinary unpickler any global
    finally:
        copyreg.remove_extension(__name__, "victim", 0x7AB)
    with pytest.raises(NeonError, match="refusing an EXT opcode"):
        safe_pickle.unpickle(io.BytesIO(data), "f")


def test_eager_tensors_are_checked_against_their_storage():
    good = pickle.dumps({"w": torch.arange(4.0)}, protocol=4)  # in-pickle legacy storages (EDM's format)
    assert torch.equal(safe_pickle.unpickle(io.BytesIO(good), "f")["w"], torch.arange(4.0))
    wide = good.replace(b"K\x04\x85", b"K\x05\x85", 1)       # the view's shape (4,) -> (5,)
    assert wide != good
    with pytest.raises(NeonError, match="reaches past the end of its storage"):
        safe_pickle.unpickle(io.BytesIO(wide), "f")


def test_extra_names_are_allowed_only_where_passed():
    data = pickle.dumps(b"bytes", protocol=2)  # protocol 2 pickles bytes through _codecs.encode
    with pytest.raises(NeonError, match="refusing to load global '_codecs.encode'"):
        safe_pickle.unpickle(io.BytesIO(data), "f")
    assert safe_pickle.unpickle(io.BytesIO(data), "f", extra={"_codecs.encode": lambda s, e: s.encode(e)}) == b"bytes"


def test_argparse_namespace_is_a_plain_record():
    data = pickle.dumps({"args": argparse.Namespace(lr=1e-4, model="xar_l")}, protocol=4)
    args = safe_pickle.unpickle(io.BytesIO(data), "f")["args"]
    assert isinstance(args, safe_pickle.Record) and args.state == {"lr": 1e-4, "model": "xar_l"}
