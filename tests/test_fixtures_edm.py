"""Our EDM networks, sampler and losses against the official code's outputs ($NEON_FIXTURES/edm/).

Every snapshot pickle in the folder is loaded with our no-exec loader and checked against its `<name>_io.pt`;
every size, argument and constant comes from those files (or the manifests), so another fixture set made the
same way passes unchanged. Tolerances are the fixture README's (Section 7).
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixtures_root
from edm import networks
from edm.checkpoint import build_network, load_snapshot
from edm.loss import EDMLoss, VPLoss
from edm.sampler import edm_sampler, effective_range, time_steps
from neon import safe_pickle

FOLDER = fixtures_root() / "edm"
PICKLES = sorted(FOLDER.glob("*.pkl"))
MANIFESTS = sorted(FOLDER.glob("manifest_*.json"))
ids = lambda paths: [p.stem for p in paths]  # noqa: E731


@functools.cache
def _load(path: Path):
    net, info = load_snapshot(str(path))
    return net, info


@functools.cache
def _io(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path.with_name(path.stem + "_io.pt"), weights_only=True)


def _python_float(t: torch.Tensor) -> float:
    """A constant stored as float32 -> the Python float the official code used (shortest round-trip decimal)."""
    return float(str(np.float32(t.item())))


def _forward_tolerance(class_name: str, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """README 7: EDM |Δ| ≤ 1e-5·max(1, σ_i) + 1e-5·|ref|; VP |Δ| ≤ 2e-4·max(1, σ_i)."""
    s = sigma.to(torch.float64).reshape(-1, *[1] * (ref.ndim - 1)).clamp(min=1)
    if class_name == "VPPrecond":
        return 2e-4 * s
    return 1e-5 * s + 1e-5 * ref.to(torch.float64).abs()


def _assert_within(actual, expected, tolerance, what):
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    worst = (diff - tolerance).max()
    assert worst <= 0, f"{what}: max |Δ| {diff.max():.3g} exceeds the tolerance"


def _assert_ulps(actual, expected, ulps, what):
    eps = torch.finfo(expected.dtype).eps
    diff = (actual.to(expected.dtype) - expected).abs()
    assert (diff <= ulps * eps * expected.abs()).all(), f"{what}: max |Δ| {diff.max():.3g} above {ulps} ulp"


def test_fixture_set_has_snapshots_and_manifests(fixtures):
    assert PICKLES, f"no *.pkl in {FOLDER}"
    assert MANIFESTS, f"no manifest_*.json in {FOLDER}"
    for p in PICKLES:
        assert p.with_name(p.stem + "_io.pt").is_file(), f"{p.name} has no io file"


# ---------------------------------------------------------------------------------------------------------
# Loading.

@pytest.mark.parametrize("path", PICKLES, ids=ids(PICKLES))
def test_snapshot_loads_strictly_with_recorded_class_and_kwargs(path):
    record = safe_pickle.load(str(path))["ema"]
    net, info = _load(path)
    assert type(net).__name__ == record.name == info["class_name"]
    assert type(net.model).__name__ == safe_pickle.child(record, "model").name
    assert not net.training
    assert all(p.requires_grad for p in net.parameters())   # ready to be fine-tuned
    expected = safe_pickle.module_state_dict(record)
    ours = net.state_dict()
    assert list(ours) == list(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    # Attributes our constructor computes (VP: sigma_min/max in float32) equal the pickled ones.
    for name, value in record.state.items():
        if not name.startswith("_") and name != "training" and not isinstance(value, safe_pickle.Record):
            assert getattr(net, name) == value, name


# ---------------------------------------------------------------------------------------------------------
# Forward pass.

@pytest.mark.parametrize("path", PICKLES, ids=ids(PICKLES))
def test_forward_matches_official(path):
    net, info = _load(path)
    io = _io(path)
    labels = io.get("class_labels")
    calls = {"D": dict(class_labels=labels)}
    if "D_nolabels" in io:
        calls["D_nolabels"] = {}  # a conditional model without labels: the official code uses a zero label row
    if "D_aug" in io:
        calls["D_aug"] = dict(class_labels=labels, augment_labels=io["augment_labels"])
    with torch.no_grad():
        for key, kwargs in calls.items():
            D = net(io["x"], io["sigma"], **kwargs)
            assert D.dtype == io[key].dtype and D.shape == io[key].shape
            _assert_within(D, io[key], _forward_tolerance(info["class_name"], io["sigma"], io[key]), key)


@pytest.mark.parametrize("path", [p for p in PICKLES if "mhblock_x" in _io(p)] or [None])
def test_multihead_attention_block_matches_official(path):
    if path is None:
        pytest.skip("no multi-head block in this fixture set")
    io = _io(path)
    state = {k[len("mhblock."):]: v for k, v in io.items() if k.startswith("mhblock.")}
    x, emb = io["mhblock_x"], io["mhblock_emb"]
    block = networks.UNetBlock(in_channels=x.shape[1], out_channels=state["conv0.weight"].shape[0],
                               emb_channels=emb.shape[1], attention=True,
                               channels_per_head=int(io["mhblock_channels_per_head"]))
    assert block.num_heads == int(io["mhblock_num_heads"])
    block.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = block.eval()(x, emb)
    ref = io["mhblock_out"]
    _assert_within(out, ref, 1e-5 + 1e-5 * ref.to(torch.float64).abs(), "mhblock_out")


# ---------------------------------------------------------------------------------------------------------
# Sampler.

def _sample_runs(path):
    io = _io(path)
    return sorted(k[: -len("_num_steps")] for k in io if k.startswith("sample") and k.endswith("_num_steps"))


SAMPLE_RUNS = [(p, run) for p in PICKLES for run in _sample_runs(p)]


def _sampler_args(io, run):
    return dict(num_steps=int(io[f"{run}_num_steps"]), sigma_min=float(io[f"{run}_sigma_min"]),
                sigma_max=float(io[f"{run}_sigma_max"]), rho=float(io[f"{run}_rho"]))


@pytest.mark.parametrize("path,run", SAMPLE_RUNS, ids=[f"{p.stem}-{r}" for p, r in SAMPLE_RUNS])
def test_time_steps_match_official(path, run):
    net, _ = _load(path)
    io = _io(path)
    args = _sampler_args(io, run)
    # The stored sigma_min/max are the values after clamping to the network's range; clamping is idempotent.
    assert effective_range(net, args["sigma_min"], args["sigma_max"]) == (args["sigma_min"], args["sigma_max"])
    t = time_steps(net, **args)
    assert t.dtype == torch.float64 and t.shape == io[f"{run}_t_steps"].shape
    assert t[-1] == 0
    _assert_ulps(t, io[f"{run}_t_steps"], 1, f"{run}_t_steps")


@pytest.mark.parametrize("path,run", SAMPLE_RUNS, ids=[f"{p.stem}-{r}" for p, r in SAMPLE_RUNS])
def test_heun_sampler_matches_official(path, run):
    net, _ = _load(path)
    io = _io(path)
    trace = []
    x = edm_sampler(net, io["latents"], io.get("sample_class_labels"), trace=trace, **_sampler_args(io, run))
    ref = io[run]
    assert x.dtype == torch.float64 and x.shape == ref.shape
    _assert_within(x, ref, 5e-5 * max(1.0, ref.abs().max().item()), run)
    assert len(trace) == 2 * int(io[f"{run}_num_steps"]) - 1
    if f"{run}_trace_x" in io:  # the per-call inputs and noise levels of the official run
        assert torch.equal(torch.stack([t for _, t, _ in trace]), io[f"{run}_trace_sigma"])
        x_tol = 5e-5 * max(1.0, io[f"{run}_trace_x"].abs().max().item())
        for i, (xi, _, _) in enumerate(trace):
            _assert_within(xi, io[f"{run}_trace_x"][i], x_tol, f"{run} call {i} input")


@pytest.mark.parametrize("path,run", SAMPLE_RUNS, ids=[f"{p.stem}-{r}" for p, r in SAMPLE_RUNS])
def test_each_denoiser_call_of_the_sampler_matches_official(path, run):
    io = _io(path)
    if f"{run}_trace_x" not in io:
        pytest.skip(f"{run} has no per-call trace")
    net, info = _load(path)
    with torch.no_grad():
        for i, (x, sigma, ref) in enumerate(zip(io[f"{run}_trace_x"], io[f"{run}_trace_sigma"], io[f"{run}_trace_D"])):
            D = net(x, sigma, io.get("sample_class_labels"))  # float64 x and 0-dim float64 sigma, as the sampler
            assert D.dtype == ref.dtype
            _assert_within(D, ref, _forward_tolerance(info["class_name"], sigma, ref), f"{run} call {i} D")


# ---------------------------------------------------------------------------------------------------------
# Training losses, with the official random draws replayed.

LOSS_CASES = [(p, kind) for p in PICKLES for kind in ("edm", "vp") if f"loss_{kind}" in _io(p)]


def _loss_object(io, kind):
    if kind == "edm":
        return EDMLoss(P_mean=_python_float(io["loss_edm_P_mean"]), P_std=_python_float(io["loss_edm_P_std"]),
                       sigma_data=_python_float(io["loss_edm_sigma_data"])), "rnd_normal"
    return VPLoss(beta_d=_python_float(io["loss_vp_beta_d"]), beta_min=_python_float(io["loss_vp_beta_min"]),
                  epsilon_t=_python_float(io["loss_vp_epsilon_t"])), "rnd_uniform"


@pytest.mark.parametrize("path,kind", LOSS_CASES, ids=[f"{p.stem}-{k}" for p, k in LOSS_CASES])
def test_loss_matches_official(path, kind):
    net, info = _load(path)
    io = _io(path)
    k = f"loss_{kind}"
    loss_fn, draw_name = _loss_object(io, kind)
    draws = {draw_name: io[f"{k}_{draw_name}"], "noise_unit": io[f"{k}_noise_unit"]}

    # Each closed form is checked on its own recorded input, as the official code computed it: the weight and the
    # noise from the recorded σ (σ itself may be 1 ulp off, which a 1-ulp check of weight(our σ) would compound).
    _assert_ulps(loss_fn.sigma(draws), io[f"{k}_sigma"], 1, f"{k}_sigma")
    _assert_ulps(loss_fn.weight(io[f"{k}_sigma"]), io[f"{k}_weight"], 1, f"{k}_weight")
    _assert_ulps(io[f"{k}_noise_unit"] * io[f"{k}_sigma"], io[f"{k}_n"], 1, f"{k}_n")

    with torch.no_grad():
        D_yn = net(io["loss_y"] + io[f"{k}_n"], io[f"{k}_sigma"], io.get("loss_class_labels"), augment_labels=None)
        _assert_within(D_yn, io[f"{k}_D_yn"], _forward_tolerance(info["class_name"], io[f"{k}_sigma"].flatten(),
                                                                 io[f"{k}_D_yn"]), f"{k}_D_yn")
        loss = loss_fn(net, io["loss_y"], io.get("loss_class_labels"), augment_pipe=None, draws=draws)
    ref = io[k]
    assert loss.shape == ref.shape and loss.dtype == ref.dtype
    _assert_within(loss, ref, 5e-5 * ref.abs().max().item(), k)
    assert abs(loss.mean().item() - io[f"{k}_mean"].item()) <= 1e-5 * abs(io[f"{k}_mean"].item())


@pytest.mark.parametrize("path,kind", LOSS_CASES, ids=[f"{p.stem}-{k}" for p, k in LOSS_CASES])
def test_loss_draws_in_the_official_order(path, kind):
    """Without `draws`, the loss takes σ's draw then the noise from the global RNG, as the official code."""
    net, _ = _load(path)
    io = _io(path)
    loss_fn, draw_name = _loss_object(io, kind)
    y = io["loss_y"]
    torch.manual_seed(123)
    first = torch.randn([y.shape[0], 1, 1, 1]) if kind == "edm" else torch.rand([y.shape[0], 1, 1, 1])
    draws = {draw_name: first, "noise_unit": torch.randn_like(y)}
    with torch.no_grad():
        replayed = loss_fn(net, y, io.get("loss_class_labels"), draws=draws)
        torch.manual_seed(123)
        drawn = loss_fn(net, y, io.get("loss_class_labels"))
    assert torch.equal(replayed, drawn)


# ---------------------------------------------------------------------------------------------------------
# Release manifests: our networks at the release configuration have the released state-dict layout.

@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_release_manifest_strict_loads_on_meta_device(path):
    manifest = json.loads(path.read_text())
    listing = manifest["state_dicts"]["ema"]
    net = build_network(manifest["ema_class"], manifest["ema_init_kwargs_expected"], "meta")

    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in net.state_dict().items()]
    assert ours == [[k, list(shape), dtype] for k, shape, dtype in listing]
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in listing}
    net.load_state_dict(state, strict=True, assign=True)

    assert sum(p.numel() for p in net.parameters()) == manifest["param_count"]
    assert len(listing) == manifest["tensor_count"]
    assert [n for n, _ in net.named_buffers()] == manifest["buffers"]
    assert sum(b.numel() for _, b in net.named_buffers()) == manifest["buffer_element_count"]
    attention = [n for n, m in net.named_modules() if getattr(m, "num_heads", 0)]
    assert attention == manifest["attention_blocks"]
    for name, value in manifest["ema_attributes_expected"].items():
        assert getattr(net, name) == (float(value) if value == "inf" else value), name


@pytest.mark.parametrize("path", MANIFESTS, ids=ids(MANIFESTS))
def test_backbone_defaults_match_the_official_ones_in_effect(path):
    manifest = json.loads(path.read_text())
    model = networks.MODELS[manifest["ema_init_kwargs_expected"]["model_type"]]
    defaults = {k: p.default for k, p in inspect.signature(model).parameters.items()}
    for name, value in manifest["model_constructor_defaults_in_effect"].items():
        default = list(defaults[name]) if isinstance(defaults[name], tuple) else defaults[name]
        assert default == value, name
