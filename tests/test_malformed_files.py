"""Every malformed checkpoint, statistics file or image set is one NeonError line naming the file, found before
anything is allocated or written: the readers check each length, offset and size against the file first."""
import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from neon import cli
from neon.errors import NeonError
from neon.images import NpzImages, save_images_npz
from neon.metrics.stats import save_stats

TB = 1 << 40


# ---- pickles (EDM/IMM format), written opcode by opcode ----------------------------------------------------

def raw_pickle(body: bytes, proto: int = 2) -> bytes:
    return bytes([0x80, proto]) + body + b"."


def _q(n: int) -> bytes:
    return struct.pack("<Q", n)


PICKLES = {
    "ext1": raw_pickle(b"\x82\x01"),
    "ext2": raw_pickle(b"\x83\x01\x00"),
    "ext4": raw_pickle(b"\x84\x01\x00\x00\x00"),
    "binbytes8-claims-a-terabyte": raw_pickle(b"\x8e" + _q(TB) + b"x" * 16, proto=4),
    "binunicode8-claims-a-terabyte": raw_pickle(b"\x8d" + _q(TB) + b"x" * 16, proto=4),
    "frame-claims-a-terabyte": raw_pickle(b"\x95" + _q(TB) + b"N", proto=4),
    "long4-claims-2-gigabytes": raw_pickle(b"\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01"),
    "persistent-id-in-a-plain-pickle": raw_pickle(b"X\x01\x00\x00\x00aQ"),
    "stack-underflow": raw_pickle(b"t"),
    "missing-memo-entry": raw_pickle(b"h\x05"),
    "global-os-system": raw_pickle(b"cos\nsystem\nX\x04\x00\x00\x00true\x85R"),
    "build-on-an-allowed-function": raw_pickle(
        b"ctorch._utils\n_rebuild_parameter\nN}X\x0c\x00\x00\x00__defaults__)s\x86b"),
    "build-on-a-numpy-dtype": raw_pickle(
        b"cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x88\x87R(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"),
    "truncated": pickle.dumps({"ema": list(range(100))}, protocol=4)[:-20],
}


# ---- torch.save zips with a crafted data.pkl ---------------------------------------------------------------

class _Storage:
    def __init__(self, pid):
        self.pid = pid


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.args = (storage, offset, shape, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def crafted_pth(path, pid, shape=(4,), stride=(1,), offset=0, records=None):
    """A torch zip whose data.pkl holds {'weight': tensor(storage=pid, ...)} and the given data/ records."""
    buf = io.BytesIO()
    _PidPickler(buf, protocol=2).dump({"weight": _Tensor(_Storage(pid), offset, shape, stride)})
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", buf.getvalue(), len(buf.getvalue()))
    for name, data in (records if records is not None else {"0": bytes(16)}).items():
        writer.write_record(f"data/{name}", data, len(data))
    writer.write_end_of_file()


PTH = {  # pid, tensor view, records
    "pid-key-with-a-path": (("storage", torch.FloatStorage, "../../x", "cpu", 4), {}),
    "pid-short-tuple": (("storage", torch.FloatStorage, "0"), {}),
    "pid-negative-numel": (("storage", torch.FloatStorage, "0", "cpu", -4), {}),
    "pid-unknown-storage-type": (("storage", "os.system", "0", "cpu", 4), {}),
    "pid-not-a-tuple": ("storage", {}),
    "record-smaller-than-its-storage": (("storage", torch.FloatStorage, "0", "cpu", 1 << 30), {}),
    "record-missing": (("storage", torch.FloatStorage, "1", "cpu", 4), {}),
    "view-past-its-storage": (("storage", torch.FloatStorage, "0", "cpu", 4), dict(shape=(1 << 20,))),
    "view-offset-past-its-storage": (("storage", torch.FloatStorage, "0", "cpu", 4), dict(offset=3, shape=(2,))),
    "view-negative-stride": (("storage", torch.FloatStorage, "0", "cpu", 4), dict(stride=(-1,))),
}


# ---- safetensors headers -----------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = bytes(32), length: int | None = None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _entry(begin, end, shape=(4,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


SAFETENSORS = {
    "header-length-past-the-file": safetensors_bytes({"a": _entry(0, 16)}, length=TB),
    "header-not-a-dict": safetensors_bytes([1, 2, 3]),
    "header-not-json": safetensors_bytes(b"{not json"),
    "entry-not-a-dict": safetensors_bytes({"a": 5}),
    "entry-missing-offsets": safetensors_bytes({"a": {"dtype": "F32", "shape": [4]}}),
    "offsets-past-the-file": safetensors_bytes({"a": _entry(16, 16 + 16 * TB, shape=(4 * TB,))}),
    "end-before-begin": safetensors_bytes({"a": _entry(16, 0)}),
    "overlapping-ranges": safetensors_bytes({"a": _entry(0, 16), "b": _entry(8, 24)}),
    "nbytes-not-numel-times-itemsize": safetensors_bytes({"a": _entry(0, 12)}),
    "negative-shape": safetensors_bytes({"a": _entry(0, 16, shape=(-4,))}),
    "unknown-dtype": safetensors_bytes({"a": _entry(0, 16, dtype="OBJ")}),
}


# ---- .npz files ------------------------------------------------------------------------------------------

def npy_bytes(descr: str, shape: tuple, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def npz(path, members: dict[str, bytes], compress: bool = False, claim_size: dict[str, int] | None = None):
    """A zip of .npy members; `claim_size` rewrites a member's declared uncompressed size (a zip bomb's lie)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    if claim_size:
        raw = bytearray(open(path, "rb").read())
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename[:-4]: i for i in zf.infolist()}
        for name, size in claim_size.items():
            info = infos[name]
            stored = info.compress_type == zipfile.ZIP_STORED
            struct.pack_into("<I", raw, info.header_offset + 22, size)       # local header: uncompressed size
            if stored:
                struct.pack_into("<I", raw, info.header_offset + 18, size)   # ... and compressed size
            central = raw.find(b"PK\x01\x02")
            while central != -1:                                             # central directory entry
                name_len = struct.unpack_from("<H", raw, central + 28)[0]
                if raw[central + 46:central + 46 + name_len] == (name + ".npy").encode():
                    struct.pack_into("<I", raw, central + 24, size)
                    if stored:
                        struct.pack_into("<I", raw, central + 20, size)
                central = raw.find(b"PK\x01\x02", central + 4)
        open(path, "wb").write(bytes(raw))


def _f8(n):
    return np.zeros(n).tobytes()


STATS = {  # members of a statistics file, compress, claimed sizes
    "mu-header-claims-terabytes": ({"mu": npy_bytes("<f8", (TB,), _f8(4)), "sigma": npy_bytes("<f8", (2, 2), _f8(4))},
                                   False, None),
    "sigma-header-claims-terabytes-compressed": (
        {"mu": npy_bytes("<f8", (2,), _f8(2)), "sigma": npy_bytes("<f8", (TB, TB), _f8(4))}, True, None),
    "zip-bomb-declared-size-matches-a-huge-shape": (
        {"mu": npy_bytes("<f8", (2,), _f8(2)), "sigma": npy_bytes("<f8", (1 << 14, 1 << 14), _f8(8))}, True,
        {"sigma": len(npy_bytes("<f8", (1 << 14, 1 << 14), b"")) + 8 * (1 << 28)}),
    "stored-member-claims-3-gigabytes": (
        {"mu": npy_bytes("<f8", (3 << 27,), _f8(2)), "sigma": npy_bytes("<f8", (2, 2), _f8(4))}, False,
        {"mu": len(npy_bytes("<f8", (3 << 27,), b"")) + (3 << 30)}),
    "object-dtype": ({"mu": npy_bytes("|O", (2,), b"\x80\x02N."), "sigma": npy_bytes("<f8", (2, 2), _f8(4))},
                     False, None),
    "bad-npy-magic": ({"mu": b"not an npy file at all", "sigma": npy_bytes("<f8", (2, 2), _f8(4))}, False, None),
}

IMAGES = {  # members of an image set, compress, claimed sizes
    "arr_0-claims-terabytes": ({"arr_0": npy_bytes("|u1", (TB, 8, 8, 3), bytes(64))}, False, None),
    "arr_0-zip-bomb": ({"arr_0": npy_bytes("|u1", (1 << 14, 64, 64, 3), bytes(1024))}, True,
                       {"arr_0": len(npy_bytes("|u1", (1 << 14, 64, 64, 3), b"")) + (1 << 14) * 64 * 64 * 3}),
    "arr_0-shape-larger-than-its-member": ({"arr_0": npy_bytes("|u1", (4, 8, 8, 3), bytes(10))}, True, None),
    "labels-claim-terabytes": ({"arr_0": npy_bytes("|u1", (2, 4, 4, 3), bytes(96)),
                                "arr_1": npy_bytes("<i8", (TB,), bytes(16))}, False, None),
    "labels-for-other-images": ({"arr_0": npy_bytes("|u1", (2, 4, 4, 3), bytes(96)),
                                 "arr_1": npy_bytes("<i8", (3,), bytes(24))}, False, None),
}


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_line_error(capsys, fn, path) -> str:
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
    return err


@pytest.fixture
def good_pth(fixtures):
    return fixtures / "var" / "var_tiny.pth"


CHECKPOINTS = [*(("pkl", k) for k in PICKLES), *(("pth", k) for k in PTH), *(("safetensors", k) for k in SAFETENSORS)]


@pytest.mark.parametrize("fmt,case", CHECKPOINTS, ids=[f"{f}-{k}" for f, k in CHECKPOINTS])
def test_malformed_checkpoint_is_one_line_and_merge_writes_nothing(tmp_path, capsys, good_pth, fmt, case):
    bad = tmp_path / f"bad.{fmt}"
    if fmt == "pkl":
        bad.write_bytes(PICKLES[case])
    elif fmt == "pth":
        pid, view = PTH[case]
        crafted_pth(bad, pid, **view)
    else:
        bad.write_bytes(SAFETENSORS[case])
    before = _listing(tmp_path)
    _one_line_error(capsys, lambda: cli.main(["merge", "--ref", str(bad), "--synth", str(good_pth), "--w", "1",
                                              "--out", str(tmp_path / f"out.{fmt}")]), bad)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("case", sorted(STATS))
def test_malformed_statistics_are_one_line_before_any_work(tmp_path, capsys, case):
    members, compress, claims = STATS[case]
    bad = tmp_path / "ref.npz"
    npz(bad, members, compress, claims)
    save_images_npz(str(tmp_path / "images.npz"), np.zeros((2, 8, 8, 3), np.uint8))
    before = _listing(tmp_path)
    _one_line_error(capsys, lambda: cli.main(["fid", "--images", str(tmp_path / "images.npz"), "--ref", str(bad),
                                              "--json", str(tmp_path / "out.json")]), bad)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_malformed_image_set_is_one_line_before_reading(tmp_path, case):
    members, compress, claims = IMAGES[case]
    bad = tmp_path / "images.npz"
    npz(bad, members, compress, claims)
    with pytest.raises(NeonError) as e:
        NpzImages(str(bad))
    assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)


def test_the_crafted_containers_are_otherwise_well_formed(tmp_path):
    """The builders above make files the readers accept when nothing is wrong, so each refusal is about its
    one defect."""
    crafted_pth(tmp_path / "ok.pth", ("storage", torch.FloatStorage, "0", "cpu", 4))
    (tmp_path / "ok.safetensors").write_bytes(safetensors_bytes({"weight": _entry(0, 16)}, bytes(16)))
    from neon.checkpoint import load_state_dict
    for name in ("ok.pth", "ok.safetensors"):
        assert load_state_dict(str(tmp_path / name))["weight"].shape == (4,)
    npz(tmp_path / "ok.npz", {"arr_0": npy_bytes("|u1", (2, 4, 4, 3), bytes(96)),
                              "arr_1": npy_bytes("<i8", (2,), bytes(16))}, compress=True)
    assert len(NpzImages(str(tmp_path / "ok.npz"))) == 2
    save_stats(tmp_path / "ref.npz", np.zeros(2), np.eye(2), count=2)
    from neon.metrics.stats import load_stats
    assert load_stats(tmp_path / "ref.npz").mu.shape == (2,)


def test_a_label_file_is_read_only_as_its_header_declares(tmp_path):
    """A `.npy` label file (neon sample --labels) whose header claims terabytes, or holds pickled objects, is one
    NeonError line naming the file, before anything is allocated; a well-formed one reads back."""
    from neon.images import read_npy
    big = tmp_path / "big.npy"
    with open(big, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
        f.write(b"\0" * 8)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([1, "a"], dtype=object), allow_pickle=True)
    for path, why in ((big, "declares shape"), (objects, "object dtype")):
        with pytest.raises(NeonError, match=why) as e:
            read_npy(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    np.save(tmp_path / "ok.npy", np.arange(4))
    assert read_npy(str(tmp_path / "ok.npy")).tolist() == [0, 1, 2, 3]
