"""Embedded source (`module_src`) that no official release carries is refused wherever its record sits in the
pickle, and on every path that reads a pickle: the family loaders, `neon merge`, `--guide`, `neon sweep --synth`.
--trust-architecture accepts it."""
from __future__ import annotations

import io
import pickle
import pickletools
import struct

import pytest
import torch
from forked_source import fork_source
from test_core_bad_input import _refused

from conftest import fixtures_root
from edm import checkpoint as edm_checkpoint
from imm import checkpoint as imm_checkpoint
from neon import cli, safe_pickle
from neon.errors import NeonError

EDM = fixtures_root() / "edm" / "edm_cond_ddpmpp.pkl"
IMM = fixtures_root() / "imm" / "imm_tiny.pkl"
HOSTILE = "import os\nos.system('echo this ran')\n"


# ---- pickle opcodes, written out: each placement is a few opcodes around one record ------------------------

def _text(s: str) -> bytes:
    data = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _record(source: str) -> bytes:
    """torch_utils.persistence._reconstruct_persistent_obj({... module_src: source, class_name: 'Hidden'})."""
    meta = (pickle.EMPTY_DICT + pickle.MARK + _text("type") + _text("class") + _text("version") + pickle.BININT1
            + b"\x06" + _text("module_src") + _text(source) + _text("class_name") + _text("Hidden")
            + _text("state") + pickle.EMPTY_DICT + pickle.SETITEMS)
    return _global("torch_utils.persistence", "_reconstruct_persistent_obj") + meta + pickle.TUPLE1 + pickle.REDUCE


R = _record(HOSTILE)
DEPTH = 100_000
PLACEMENTS = {
    "dict_key": pickle.EMPTY_DICT + R + pickle.BININT1 + b"\x01" + pickle.SETITEM,
    "frozenset": pickle.MARK + R + pickle.FROZENSET,
    "set": pickle.EMPTY_SET + pickle.MARK + R + pickle.ADDITEMS,
    "tuple": pickle.MARK + R + pickle.TUPLE,
    "list": pickle.EMPTY_LIST + pickle.MARK + R + pickle.APPENDS,
    "module_argument": _global("torch.nn.modules.linear", "Identity") + pickle.MARK + R + pickle.TUPLE + pickle.REDUCE,
    "module_keyword": _global("torch.nn.modules.linear", "Identity") + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT
                      + _text("k") + R + pickle.SETITEM + pickle.NEWOBJ_EX,
    "module_state": _global("torch.nn.modules.linear", "Identity") + pickle.EMPTY_TUPLE + pickle.REDUCE
                    + pickle.EMPTY_DICT + _text("k") + R + pickle.SETITEM + pickle.BUILD,
    "ordered_dict_attribute": _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
                              + pickle.EMPTY_DICT + _text("_metadata") + R + pickle.SETITEM + pickle.BUILD,
    "built_then_dropped": R + pickle.POP + pickle.NONE,
    "nested_lists": pickle.EMPTY_LIST * DEPTH + R + pickle.APPEND * DEPTH,
}


def with_hidden(src, out, value: bytes) -> None:
    """`src` (a persistence pickle: one top-level dict, the last frame holding its end) with one more item,
    'hidden': the object `value` builds. Every other byte stays, so the tensors stay where they were."""
    data = bytearray(src.read_bytes())
    frame = max(pos for op, _, pos in pickletools.genops(bytes(data)) if op.name == "FRAME")
    (size,) = struct.unpack_from("<Q", data, frame + 1)
    assert frame + 9 + size == len(data) and data[-1:] == pickle.STOP
    item = _text("hidden") + value + pickle.SETITEM
    struct.pack_into("<Q", data, frame + 1, size + len(item))
    out.write_bytes(bytes(data[:-1]) + item + pickle.STOP)


def _edm_weights(path, trust=False):
    return edm_checkpoint.load_network(str(path), trust_architecture=trust).state_dict()


def _imm_weights(path, trust=False):
    return imm_checkpoint.read_checkpoint(str(path), trust)[1]


LOADERS = {"edm": (EDM, _edm_weights), "imm": (IMM, _imm_weights)}


# ---- every placement, both families ------------------------------------------------------------------------

@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("family", list(LOADERS))
def test_a_record_with_unknown_source_is_refused_wherever_it_sits_and_trust_accepts_it(tmp_path, capsys, family,
                                                                                      placement):
    fixture, weights = LOADERS[family]
    path = tmp_path / "hidden.pkl"
    with_hidden(fixture, path, PLACEMENTS[placement])
    with pytest.raises(NeonError, match=r"hidden.pkl: the embedded source of Hidden .*--trust-architecture") as e:
        weights(path)
    assert "\n" not in str(e.value)
    trusted, official = weights(path, trust=True), weights(fixture)
    assert "warning:" in capsys.readouterr().err
    assert trusted.keys() == official.keys() and all(torch.equal(trusted[k], official[k]) for k in official)


def test_the_same_placements_with_source_of_no_code_are_read_as_they_are(tmp_path):
    path = tmp_path / "stripped.pkl"
    value = pickle.MARK + b"".join(v.replace(R, _record("# source omitted\n")) for k, v in PLACEMENTS.items()
                                   if k != "nested_lists") + pickle.TUPLE
    with_hidden(EDM, path, value)
    assert _edm_weights(path).keys() == _edm_weights(EDM).keys()


def test_a_record_inside_a_nested_storage_stream_is_seen_when_reading_lazily(tmp_path):
    stream = next(arg for _, arg, _ in pickletools.genops(pickle.dumps(torch.arange(4.0), protocol=4))
                  if isinstance(arg, bytes) and arg.startswith(safe_pickle.LEGACY_MAGIC))  # as EDM pickles hold them
    ends, rest = [], io.BytesIO(stream)
    for _ in range(3):  # magic number, protocol version, sys_info: the record replaces sys_info
        list(pickletools.genops(rest))
        ends.append(rest.tell())
    nested = stream[:ends[1]] + pickle.PROTO + b"\x02" + R + pickle.STOP + stream[ends[2]:]
    path = tmp_path / "nested.pkl"
    path.write_bytes(pickle.PROTO + b"\x02" + _global("torch.storage", "_load_from_bytes") + pickle.BINBYTES
                     + struct.pack("<I", len(nested)) + nested + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    records: list[safe_pickle.Record] = []
    assert isinstance(safe_pickle.load(str(path), lazy=True, records=records), safe_pickle.BlobRef)
    assert [r.name for r in records] == ["Hidden"]
    with pytest.raises(NeonError, match="nested.pkl: the embedded source of Hidden"):
        safe_pickle.check_sources(records, edm_checkpoint.OFFICIAL_SOURCES, str(path))
    with pytest.raises(NeonError, match="nested.pkl"):  # eagerly, torch's weights-only reader refuses the stream
        safe_pickle.load(str(path))


# ---- every path that reads θs ------------------------------------------------------------------------------

@pytest.fixture
def fork(tmp_path):
    """The EDM fixture with other code as every class's source, same weights."""
    path = tmp_path / "fork.pkl"
    assert fork_source(EDM, path) > 0
    return path


@pytest.mark.parametrize("side", ["--synth", "--ref"])
def test_neon_merge_refuses_an_input_with_unknown_source_and_writes_nothing(tmp_path, capsys, fork, side):
    inputs = {"--ref": EDM, "--synth": EDM, side: fork}
    argv = ["merge", "--ref", inputs["--ref"], "--synth", inputs["--synth"], "--w", "0.5", "--out", tmp_path / "m.pkl"]
    err = _refused(capsys, argv, tmp_path)
    assert f"{fork}: the embedded source of " in err and "--trust-architecture" in err
    cli.main([str(a) for a in argv] + ["--trust-architecture"])
    assert "warning:" in capsys.readouterr().err and (tmp_path / "m.pkl").is_file()


def test_neon_merge_refuses_a_record_hidden_in_a_dict_key(tmp_path, capsys):
    with_hidden(EDM, tmp_path / "hidden.pkl", PLACEMENTS["dict_key"])
    err = _refused(capsys, ["merge", "--ref", EDM, "--synth", tmp_path / "hidden.pkl", "--w", "0.5",
                            "--out", tmp_path / "m.pkl"], tmp_path)
    assert "hidden.pkl: the embedded source of Hidden" in err


def test_neon_merge_reads_official_source_of_any_registered_family_without_trust(tmp_path):
    from neon.checkpoint import known_sources
    assert set(edm_checkpoint.OFFICIAL_SOURCES) | set(imm_checkpoint.OFFICIAL_SOURCES) <= set(known_sources())
    for fixture in (EDM, IMM):
        cli.main(["merge", "--ref", str(fixture), "--synth", str(fixture), "--w", "0.5",
                  "--out", str(tmp_path / fixture.name)])
        assert (tmp_path / fixture.name).read_bytes() == fixture.read_bytes()  # θs = θr: θneon = θr


def test_a_guide_with_unknown_source_is_refused_and_trust_accepts_it(tmp_path, capsys, fork):
    out = tmp_path / "s.npz"
    argv = ["sample", "--family", "edm", "--ckpt", EDM, "--guide", fork, "--seeds", "0-1", "--out", out,
            "--arg", "guide_scale=0.5", "--arg", "num_steps=2"]
    err = _refused(capsys, argv, tmp_path)
    assert f"{fork}: the embedded source of " in err and "--trust-architecture" in err
    cli.main([str(a) for a in argv] + ["--trust-architecture"])
    assert "warning:" in capsys.readouterr().err and out.is_file()


def test_neon_sweep_refuses_a_synth_with_unknown_source_before_anything_else(tmp_path, capsys, fork):
    argv = ["sweep", "--family", "edm", "--tiny", "--synth", fork, "--ref-stats", tmp_path / "absent.npz",
            "--out", tmp_path / "sweep", "--w", "0", "0.5", "--num-images", "8"]
    err = _refused(capsys, argv, tmp_path)
    assert f"{fork}: the embedded source of " in err and "--trust-architecture" in err
    with pytest.raises(SystemExit):  # θs is read, with a warning; the missing statistics are refused next
        cli.main([str(a) for a in argv] + ["--trust-architecture"])
    warning, refusal = capsys.readouterr().err.strip().split("\n")
    assert warning.startswith(f"warning: {fork}: ") and "absent.npz" in refusal


@pytest.mark.parametrize("family", ["edm", "imm"])
def test_a_network_loaded_from_a_trusted_fork_saves_into_a_copy_of_the_fork(tmp_path, capsys, family):
    from neon.family import get_family
    fixture = LOADERS[family][0]
    assert fork_source(fixture, tmp_path / "fork.pkl") > 0
    load_args = {"vae_path": "tiny"} if family == "imm" else {}
    bundle = get_family(family).load(str(tmp_path / "fork.pkl"), trust_architecture=True, **load_args)
    get_family(family).save(bundle, str(tmp_path / "out.pkl"))
    assert "warning:" in capsys.readouterr().err
    assert (tmp_path / "out.pkl").read_bytes() == (tmp_path / "fork.pkl").read_bytes()  # same weights, same file
    untrusted = get_family(family).load(str(fixture), **load_args)
    untrusted.source = str(tmp_path / "fork.pkl")   # a template nobody accepted: refused, nothing written
    with pytest.raises(NeonError, match="fork.pkl: the embedded source of "):
        get_family(family).save(untrusted, str(tmp_path / "other.pkl"))
    assert not (tmp_path / "other.pkl").exists()


def test_a_torch_zip_holding_a_record_with_unknown_source_is_refused(tmp_path, monkeypatch):
    import sys
    import types

    from neon.checkpoint import open_checkpoint
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # only pickled here, never called
        raise AssertionError("never called")

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    class Hidden:
        def __reduce__(self):
            return _reconstruct_persistent_obj, (dict(type="class", version=6, module_src=HOSTILE,
                                                      class_name="Hidden", state={}),)

    torch.save({"model": {"w": torch.zeros(2)}, "extra": {Hidden(): 1}}, tmp_path / "h.pth")
    with pytest.raises(NeonError, match="h.pth: the embedded source of Hidden"):
        open_checkpoint(str(tmp_path / "h.pth"))
    assert list(open_checkpoint(str(tmp_path / "h.pth"), trust_architecture=True).tensors) == ["w"]
