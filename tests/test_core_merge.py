"""θneon = (1+w)·θr − w·θs on every container, and every refusal, checked on real files."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from neon import safe_pickle
from neon.checkpoint import load_state_dict, open_checkpoint, write_like
from neon.errors import NeonError
from neon.merge import merge_files, merge_state_dicts


def _state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g) * scale,
        "conv.bias": torch.randn(4, generator=g) * scale,
        "half.weight": (torch.randn(5, 2, generator=g) * scale).to(torch.bfloat16),
        "double.weight": (torch.randn(3, generator=g) * scale).to(torch.float64),
        "num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
        "mask": torch.tensor([True, False, seed % 2 == 0]),
    }


def _expected(theta_r, theta_s, w):
    out = {}
    for k, a in theta_r.items():
        if a.is_floating_point():
            acc = torch.float64 if a.dtype == torch.float64 else torch.float32
            out[k] = (a.to(acc) * (1 + w) - theta_s[k].to(acc) * w).to(a.dtype)
        else:
            out[k] = a
    return out


def _assert_equal_sd(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


CONTAINERS = {
    "plain": lambda sd: sd,
    "model_ema": lambda sd: {"model": {k: v * 0 if v.is_floating_point() else v for k, v in sd.items()},
                             "model_ema": sd, "epoch": 7, "args": {"lr": 1e-6}},
    "neon_xar": lambda sd: {"model_ema": sd, "epoch": 0},
    "ema": lambda sd: {"ema": sd, "step": torch.tensor(3)},
    "state_dict": lambda sd: {"state_dict": sd, "meta": "x"},
}


@pytest.mark.parametrize("container", sorted(CONTAINERS))
def test_merge_pth_exact_for_w0_and_w1(tmp_path, container):
    theta_r, theta_s = _state(1), _state(2, scale=1.5)
    torch.save(CONTAINERS[container](theta_r), tmp_path / "r.pth")
    torch.save(CONTAINERS[container](theta_s), tmp_path / "s.pth")
    merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), [0.0, 1.0], str(tmp_path / "m_{w}.pth"))
    ref_obj = torch.load(tmp_path / "r.pth", weights_only=True)
    for w in (0.0, 1.0):
        obj = torch.load(tmp_path / f"m_{w:g}.pth", weights_only=True)
        module = open_checkpoint(str(tmp_path / "r.pth")).module
        merged = obj[module] if module else obj
        want = theta_r if w == 0 else _expected(theta_r, theta_s, w)
        _assert_equal_sd(merged, want)
        # everything else the reference holds is kept as it is
        if isinstance(ref_obj, dict) and module:
            for key, value in ref_obj.items():
                if key != module:
                    assert str(obj[key]) == str(value), key
    m1 = load_state_dict(str(tmp_path / "m_1.pth"))
    assert torch.equal(m1["conv.weight"], 2 * theta_r["conv.weight"] - theta_s["conv.weight"])


def test_integer_and_bool_buffers_come_from_theta_r():
    merged = merge_state_dicts(_state(1), _state(2), 0.7)
    assert merged["num_batches_tracked"].item() == 1
    assert torch.equal(merged["mask"], _state(1)["mask"])


def test_merge_safetensors_exact_and_keeps_metadata(tmp_path):
    theta_r, theta_s = _state(3), _state(4)
    save_file(theta_r, tmp_path / "r.safetensors", metadata={"format": "pt", "who": "neon"})
    save_file(theta_s, tmp_path / "s.safetensors")
    merge_files(str(tmp_path / "r.safetensors"), str(tmp_path / "s.safetensors"), [0.0, 1.0, 0.3],
                str(tmp_path / "m.safetensors"))
    _assert_equal_sd(dict(sorted(load_file(tmp_path / "m_w0.safetensors").items())), dict(sorted(theta_r.items())))
    for w in (1.0, 0.3):
        got = load_file(tmp_path / f"m_w{w:g}.safetensors")
        _assert_equal_sd(dict(sorted(got.items())), dict(sorted(_expected(theta_r, theta_s, w).items())))
    from safetensors import safe_open
    with safe_open(tmp_path / "m_w1.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "neon"}


@pytest.mark.parametrize("name", ["edm/edm_cond_ddpmpp.pkl", "imm/imm_tiny.pkl"])
def test_merge_persistence_pickle_exact_and_byte_identical_elsewhere(tmp_path, fixtures, name):
    ref = fixtures / name
    if not ref.exists():
        pytest.skip(f"{name} not in this fixture set")
    theta_r = load_state_dict(str(ref))
    theta_s = {k: v + 0.25 * torch.randn_like(v) if v.is_floating_point() else v for k, v in theta_r.items()}
    write_like(str(ref), str(tmp_path / "s.pkl"), theta_s)
    merge_files(str(ref), str(tmp_path / "s.pkl"), [0.0, 1.0], str(tmp_path / "m.pkl"))
    assert (tmp_path / "m_w0.pkl").read_bytes() == ref.read_bytes()  # w = 0 gives θr bit for bit
    _assert_equal_sd(load_state_dict(str(tmp_path / "m_w1.pkl")), _expected(theta_r, theta_s, 1.0))
    # the rest of the container (loss_fn, dataset_kwargs, ...) is untouched
    a, b = safe_pickle.load(str(ref)), safe_pickle.load(str(tmp_path / "m_w1.pkl"))
    assert sorted(a) == sorted(b)
    for key in a:
        if key != "ema" and not isinstance(a[key], safe_pickle.Record):
            assert a[key] == b[key]


def test_refuses_keys_that_differ_naming_the_key(tmp_path):
    theta_r, theta_s = _state(1), _state(2)
    theta_s.pop("conv.bias")
    torch.save(theta_r, tmp_path / "r.pth")
    torch.save(theta_s, tmp_path / "s.pth")
    with pytest.raises(NeonError, match="conv.bias"):
        merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), 0.5, str(tmp_path / "m.pth"))
    assert not (tmp_path / "m.pth").exists()


def test_refuses_shapes_that_differ(tmp_path):
    theta_r, theta_s = _state(1), _state(2)
    theta_s["conv.bias"] = torch.zeros(5)
    torch.save(theta_r, tmp_path / "r.pth")
    torch.save(theta_s, tmp_path / "s.pth")
    with pytest.raises(NeonError, match=r"conv.bias.*\(4,\) vs \(5,\)"):
        merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), 0.5, str(tmp_path / "m.pth"))
    assert not (tmp_path / "m.pth").exists()


def test_refuses_checkpoints_of_different_families(tmp_path, fixtures):
    edm, imm = fixtures / "edm" / "edm_cond_ddpmpp.pkl", fixtures / "imm" / "imm_tiny.pkl"
    with pytest.raises(NeonError, match="different families"):
        merge_files(str(edm), str(imm), 0.5, str(tmp_path / "m.pkl"))
    torch.save(_state(1), tmp_path / "r.pth")
    with pytest.raises(NeonError, match="different families"):
        merge_files(str(tmp_path / "r.pth"), str(edm), 0.5, str(tmp_path / "m.pth"))
    assert not list(tmp_path.glob("m*"))


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf")])
def test_refuses_non_finite_w(tmp_path, w):
    torch.save(_state(1), tmp_path / "r.pth")
    with pytest.raises(NeonError, match="finite"):
        merge_files(str(tmp_path / "r.pth"), str(tmp_path / "r.pth"), w, str(tmp_path / "m.pth"))
    assert not (tmp_path / "m.pth").exists()


def test_refuses_existing_output_unless_forced(tmp_path):
    torch.save(_state(1), tmp_path / "r.pth")
    torch.save(_state(2), tmp_path / "s.pth")
    (tmp_path / "m.pth").write_bytes(b"keep me")
    with pytest.raises(NeonError, match="exists"):
        merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), 0.5, str(tmp_path / "m.pth"))
    assert (tmp_path / "m.pth").read_bytes() == b"keep me"
    merge_files(str(tmp_path / "r.pth"), str(tmp_path / "s.pth"), 0.5, str(tmp_path / "m.pth"), force=True)
    _assert_equal_sd(torch.load(tmp_path / "m.pth", weights_only=True), _expected(_state(1), _state(2), 0.5))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"ema": _Payload(marker)}, f)
    torch.save(_state(1), tmp_path / "r.pth")
    with pytest.raises(NeonError, match="refusing to load global"):
        merge_files(str(tmp_path / "evil.pkl"), str(tmp_path / "r.pth"), 0.5, str(tmp_path / "m.pkl"))
    with pytest.raises(NeonError, match="refusing to load global"):
        safe_pickle.load(str(tmp_path / "evil.pkl"))
    assert not marker.exists()
    # the same file would run its payload if loaded the ordinary way: the test above is not vacuous
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_malicious_global_inside_a_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _state(1), "hook": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(NeonError, match="refusing to load global"):
        open_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_merge_cli_writes_one_file_per_w_and_fails_in_one_line(tmp_path):
    torch.save({"model_ema": _state(1)}, tmp_path / "r.pth")
    torch.save({"model_ema": _state(2)}, tmp_path / "s.pth")
    cmd = [sys.executable, "-m", "neon", "merge", "--ref", str(tmp_path / "r.pth"), "--synth",
           str(tmp_path / "s.pth"), "--out", str(tmp_path / "neon.pth")]
    subprocess.run(cmd + ["--w", "0.25", "0.5"], check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.glob("neon*")) == ["neon_w0.25.pth", "neon_w0.5.pth"]
    bad = subprocess.run(cmd + ["--w", "nan"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "finite" in bad.stderr


def test_truncated_file_is_a_clear_error(tmp_path):
    torch.save(_state(1), tmp_path / "r.pth")
    data = (tmp_path / "r.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(NeonError):
        load_state_dict(str(tmp_path / "cut.pth"))
    with pytest.raises(NeonError, match="not found"):
        load_state_dict(str(tmp_path / "missing.pth"))
    shutil.rmtree(tmp_path)


def test_entries_equal_in_both_are_kept_exactly_even_infinite():
    mask = torch.tensor([[0.0, -float("inf")], [0.0, 0.0]])
    rope = torch.tensor([0.1, 0.7, 1e-3])
    theta_r = {"mask": mask, "rope": rope, "w": torch.tensor([1.0, 2.0])}
    theta_s = {"mask": mask.clone(), "rope": rope.clone(), "w": torch.tensor([1.0, 3.0])}
    merged = merge_state_dicts(theta_r, theta_s, 0.37)
    assert torch.equal(merged["mask"], mask) and torch.equal(merged["rope"], rope)
    assert merged["w"].tolist() == [1.0, pytest.approx(2.0 * 1.37 - 3.0 * 0.37)]


def test_a_refusal_while_a_pth_is_written_leaves_no_file_and_the_process_alive(tmp_path):
    """The torch zip writer finishes its file when destroyed: a `replace` that refuses a tensor half-way must
    not make it write into a closed file (which aborts the interpreter), and the temporary file is removed."""
    from neon.checkpoint import atomic_save
    atomic_save({"a": torch.ones(3), "b": torch.zeros(2)}, str(tmp_path / "r.pth"))

    def refuse(key, t):
        raise NeonError(f"{key}: refused")
    with pytest.raises(NeonError, match="refused"):
        open_checkpoint(str(tmp_path / "r.pth")).write(str(tmp_path / "out.pth"), refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pth"]
