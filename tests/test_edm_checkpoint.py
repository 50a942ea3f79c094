"""EDM checkpoints: nothing in a pickle runs while loading; Neon outputs keep the official container."""
from __future__ import annotations

import os
import pickle
import pickletools
import sys
import types

import pytest
import torch

from conftest import fixtures_root
from edm import checkpoint
from edm.adapter import EDMFamily
from neon import safe_pickle
from neon.checkpoint import load_state_dict, open_checkpoint
from neon.errors import NeonError

PICKLES = sorted((fixtures_root() / "edm").glob("*.pkl"))


class _RunsShellCommand:
    """Unpickling this calls os.system(command): what a hostile checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickle_with_os_system_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "hostile.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": _RunsShellCommand(f"touch {marker}"), "loss_fn": None}, f)

    with pytest.raises(NeonError, match="refusing to load global"):
        checkpoint.load_network(str(path))
    assert not marker.exists()

    # The payload is live: a plain unpickler runs it (this is what the refusal prevented).
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_torch_save_container_with_os_system_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"ema": _RunsShellCommand(f"touch {marker}"), "neon_family": "edm"}, path)
    with pytest.raises(NeonError, match="not a readable EDM container"):
        checkpoint.load_network(str(path))
    assert not marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path, monkeypatch):
    """A persistence record whose embedded source would create a file: our loader reads it as data only."""
    marker = tmp_path / "module-src-ran"

    def _reconstruct_persistent_obj(meta):  # stands in for torch_utils.persistence's (only while writing)
        raise AssertionError("never called")

    module = types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)

    class Persistent:
        def __reduce__(self):
            meta = dict(type="class", version=6, class_name="EDMPrecond",
                        module_src=f"open({str(marker)!r}, 'w').close()",
                        state=dict(_init_kwargs=dict(img_resolution=8, img_channels=3), _parameters={},
                                   _buffers={}, _modules={}))
            return _reconstruct_persistent_obj, (meta,)

    path = tmp_path / "snapshot.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": Persistent()}, f)
    with pytest.raises(NeonError, match="embedded source of EDMPrecond .* is not an official release's"):
        checkpoint.load_network(str(path))
    with pytest.raises(NeonError, match="weights do not match EDMPrecond"):  # read as data: no weights in it
        checkpoint.load_network(str(path), trust_architecture=True)
    assert not marker.exists()


@pytest.mark.parametrize("path", PICKLES, ids=[p.stem for p in PICKLES])
def test_neon_pickle_keeps_the_template_container_and_reloads_with_our_weights(path, tmp_path):
    family = EDMFamily()
    bundle = family.load(str(path))
    theta_r = {k: v.clone() for k, v in bundle.net.state_dict().items()}
    with torch.no_grad():  # stand-in for a merge: (1 + w)·θr − w·θs with θs = θr + noise
        for p in bundle.net.parameters():
            p.add_(torch.randn_like(p), alpha=-0.5)
    written = {k: v.clone() for k, v in bundle.net.state_dict().items()}
    out = tmp_path / "neon.pkl"
    family.save(bundle, str(out))

    reloaded = checkpoint.load_network(str(out)).state_dict()
    assert list(reloaded) == list(written)
    assert all(torch.equal(reloaded[k], written[k]) for k in written)
    assert any(not torch.equal(written[k], theta_r[k]) for k in written)

    # Only tensor bytes changed: same size and the same opcodes with the same non-bytes arguments, so the official
    # unpickler (pickle.load(f)['ema']) reads it as it reads the template.
    assert out.stat().st_size == path.stat().st_size
    assert _opcodes(out) == _opcodes(path)
    template, ours = safe_pickle.load(str(path)), safe_pickle.load(str(out))
    assert ours["dataset_kwargs"] == template["dataset_kwargs"]
    assert safe_pickle.init_kwargs(ours["ema"]) == safe_pickle.init_kwargs(template["ema"])
    assert family.load(str(out)).info == dict(family.load(str(path)).info)

    # The core's lazy reader finds the same network under 'ema'.
    ckpt = open_checkpoint(str(out))
    assert ckpt.module == "ema" and ckpt.class_name == type(bundle.net).__name__


def _opcodes(path):
    with open(path, "rb") as f:
        return [(op.name, None if isinstance(arg, bytes) else arg) for op, arg, _ in pickletools.genops(f)]


def test_own_container_loads_with_weights_only_and_is_mergeable(tmp_path):
    family = EDMFamily()
    bundle = family.tiny(seed=3, conditional=True)
    out = tmp_path / "tiny.pt"
    family.save(bundle, str(out))

    raw = torch.load(out, weights_only=True)
    assert raw["neon_family"] == "edm" and raw["class_name"] == "EDMPrecond"
    assert raw["init_kwargs"]["label_dim"] == 10
    expected = bundle.net.state_dict()
    assert all(torch.equal(raw["ema"][k], expected[k]) for k in expected)
    assert set(load_state_dict(str(out))) == set(expected)   # the core reads the network under 'ema'

    reloaded = family.load(str(out))
    assert all(torch.equal(reloaded.net.state_dict()[k], v) for k, v in expected.items())
    assert reloaded.info["augment_kwargs"] == bundle.info["augment_kwargs"]


def test_safetensors_export_round_trips(tmp_path):
    family = EDMFamily()
    bundle = family.tiny(seed=4, conditional=False)
    out = tmp_path / "tiny.safetensors"
    family.save(bundle, str(out))
    reloaded = checkpoint.load_network(str(out))
    assert type(reloaded).__name__ == "EDMPrecond" and reloaded.label_dim == 0
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in bundle.net.state_dict().items())


def test_bare_state_dict_is_refused_with_a_clear_error(tmp_path):
    bundle = EDMFamily().tiny()
    out = tmp_path / "bare.pt"
    checkpoint.export_state_dict(bundle.net, str(out))
    with pytest.raises(NeonError, match="class and arguments"):
        checkpoint.load_network(str(out))


def test_truncated_pickle_is_a_neon_error(tmp_path):
    source = PICKLES[0].read_bytes()
    out = tmp_path / "truncated.pkl"
    out.write_bytes(source[: len(source) // 2])
    with pytest.raises(NeonError):
        checkpoint.load_network(str(out))


# ---- embedded source: only the official releases' is rebuilt from our code ---------------------------------

def test_pickle_whose_embedded_source_is_not_official_is_refused_naming_the_class(tmp_path):
    from forked_source import fork_source
    for path in PICKLES:
        fork = tmp_path / f"fork_{path.name}"
        assert fork_source(path, fork) > 0
        ema = safe_pickle.load(str(path))["ema"]
        with pytest.raises(NeonError, match=rf"fork_{path.name}: the embedded source of .*{ema.name}") as e:
            checkpoint.load_network(str(fork))
        assert "\n" not in str(e.value) and "--trust-architecture" in str(e.value)


def test_trust_architecture_loads_a_forked_pickle_with_a_warning(tmp_path, capsys):
    from forked_source import fork_source
    path = PICKLES[0]
    fork_source(path, tmp_path / "fork.pkl")
    net = EDMFamily().load(str(tmp_path / "fork.pkl"), trust_architecture=True).net
    assert "warning:" in capsys.readouterr().err
    reference = checkpoint.load_network(str(path)).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())


def test_source_hash_ignores_line_endings_and_trailing_spaces_only():
    code = "class EDMPrecond:\n    sigma_data = 0.5\n"
    digest = safe_pickle.source_sha256(code)
    assert safe_pickle.source_sha256(code.replace("\n", "\r\n")) == digest
    assert safe_pickle.source_sha256("class EDMPrecond:   \n    sigma_data = 0.5\n\n\n") == digest
    assert safe_pickle.source_sha256(code.replace("0.5", "0.6")) != digest
    assert safe_pickle.source_sha256("# no code here\n\n") is None
    assert set(checkpoint.OFFICIAL_SOURCES) and all(len(h) == 64 for h in checkpoint.OFFICIAL_SOURCES)


def test_cli_flag_trust_architecture_reaches_the_loader(tmp_path, capsys):
    from forked_source import fork_source

    from neon.cli import build_parser
    from neon.sampling import load_model
    fork_source(PICKLES[0], tmp_path / "fork.pkl")
    argv = ["sample", "--family", "edm", "--ckpt", str(tmp_path / "fork.pkl"), "--out", str(tmp_path / "x.npz"),
            "--seeds", "0-1"]
    with pytest.raises(NeonError, match="--trust-architecture"):
        load_model(build_parser("sample").parse_args(argv))
    load_model(build_parser("sample").parse_args(argv + ["--trust-architecture"]))
    assert "warning:" in capsys.readouterr().err
