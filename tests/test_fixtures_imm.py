"""IMM against the official code's own outputs ($NEON_FIXTURES/imm, see its README).

Every size and argument comes from the fixture files (the tiny checkpoint's recorded config, the tensors in
io.pt, the manifests); the tolerances are the README's.
"""
import json
import re

import pytest
import torch

from imm.adapter import LOSS_DEFAULTS
from imm.checkpoint import load_network, read_checkpoint
from imm.loss import IMMLoss
from imm.precond import IMMPrecond
from imm.sampler import guided_step, pushforward, time_grid
from imm.vae import tiny_vae

FWD = dict(atol=3e-5, rtol=1e-4)          # forward outputs, guided steps, samples
DECODE = dict(atol=3e-4, rtol=1e-4)       # SD-VAE input: the sample divided by scale ~ 0.1
LOSS = dict(atol=1e-7, rtol=1e-5)         # loss value and its similarity terms
F_LOSS = dict(atol=3e-5, rtol=0)          # the two flow-map branches inside the loss
TIMES = dict(atol=1e-12, rtol=0)          # (t, r, s) from the uniform draws, float64


@pytest.fixture(scope="module")
def folder(fixtures):
    return fixtures / "imm"


@pytest.fixture(scope="module")
def io(folder):
    return torch.load(folder / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def checkpoint(folder):
    (path,) = sorted(folder.glob("*.pkl"))
    return path


def temb_types(io) -> list[str]:
    """The time-embedding variants the fixture recorded (fwd_<temb>_out)."""
    return sorted(m.group(1) for k in io if (m := re.fullmatch(r"fwd_(\w+)_out", k)))


def networks(checkpoint, io) -> dict[str, IMMPrecond]:
    return {temb: load_network(checkpoint, temb_type=temb) for temb in temb_types(io)}


def close(actual, expected, name, atol, rtol):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    actual = actual.to(expected.dtype)
    diff = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{name}: max |diff| {diff:.3g}"
    return diff


def test_every_fixture_file_is_checked(folder):
    handled = re.compile(r"(io\.pt|README\.md|manifest_.+\.json|[^/]+\.pkl)")
    unknown = [p.name for p in folder.iterdir() if not handled.fullmatch(p.name)]
    assert not unknown, f"fixture files no test reads: {unknown}"
    assert len(list(folder.glob("*.pkl"))) == 1 and list(folder.glob("manifest_*.json"))


def test_float32_default_dtype_recorded(io):
    assert bool(io["default_dtype_is_float32"]) and torch.get_default_dtype() == torch.float32


def test_checkpoint_weights_read_exactly(checkpoint, io):
    net = load_network(checkpoint)
    total = sum(t.double().abs().sum() for t in net.state_dict().values())
    assert torch.allclose(total, io["state_dict_checksum_sum_abs"], rtol=1e-12, atol=0)


def test_checkpoint_config_builds_the_recorded_network(checkpoint):
    kwargs, state_dict = read_checkpoint(checkpoint)
    net = load_network(checkpoint)
    assert list(net.state_dict()) == list(state_dict)  # same names, same order as the official module
    assert net.temb_type == kwargs["temb_type"] and net.label_dim == kwargs["label_dim"]
    assert net.model.y_embedder.embedding_table.num_embeddings == kwargs.get("num_classes", 1000) + 1


def test_class_index_selects_null_row_for_zero_labels(checkpoint, io):
    net = load_network(checkpoint)
    for prefix in ("fwd", "sample"):
        assert torch.equal(net.model.class_index(io[f"{prefix}_class_onehot"]), io[f"{prefix}_class_index"])


def test_forward_matches_official(checkpoint, io):
    x, y = io["fwd_x_t"], io["fwd_class_onehot"]
    t, s = io["fwd_t"].reshape(-1, 1, 1, 1), io["fwd_s"].reshape(-1, 1, 1, 1)
    for temb, net in networks(checkpoint, io).items():
        with torch.no_grad():
            close(net.model_output(x, t, s, y), io[f"fwd_{temb}_F"], f"fwd_{temb}_F", **FWD)
            close(net(x, t, s, y), io[f"fwd_{temb}_out"], f"fwd_{temb}_out", **FWD)


def test_guided_step_matches_official_cfg_forward(checkpoint, io):
    cfg_scale = io["cfgstep_cfg_scale"].item()
    for temb, net in networks(checkpoint, io).items():
        with torch.no_grad():
            out = guided_step(net, io["fwd_x_t"].double(), io["cfgstep_t"], io["cfgstep_s"],
                              io["fwd_class_onehot"], cfg_scale)
        assert out.dtype == torch.float64
        close(out, io[f"cfgstep_{temb}_out"], f"cfgstep_{temb}_out", **FWD)


def sampler_cases(io):
    """(key, temb, num_steps, cfg_scale) for every recorded final sample sample_<temb>_T<n>_<cfg1.5|nocfg>."""
    for key in sorted(io):
        m = re.fullmatch(r"sample_(\w+?)_T(\d+)_(nocfg|cfg([0-9.]+))", key)
        if m:
            yield key, m.group(1), int(m.group(2)), None if m.group(3) == "nocfg" else float(m.group(4))


def test_time_grids_match_official(checkpoint, io):
    net = load_network(checkpoint)
    grids = {int(k.rsplit("T", 1)[1]): v for k, v in io.items() if re.fullmatch(r"sample_tsteps_T\d+", k)}
    assert grids
    for steps, expected in grids.items():
        close(time_grid(net, steps), expected, f"sample_tsteps_T{steps}", atol=0, rtol=0)


def test_pushforward_sampler_matches_official(checkpoint, io):
    nets = networks(checkpoint, io)
    cases = list(sampler_cases(io))
    assert {c[2] for c in cases} and {c[1] for c in cases} <= set(nets)
    for key, temb, steps, cfg_scale in cases:
        x, states = pushforward(nets[temb], io["sample_latents"], io["sample_class_onehot"], steps, cfg_scale,
                                trajectory=True)
        assert x.dtype == torch.float64
        close(x, io[key], key, **FWD)
        if f"{key}_traj" in io:
            close(states, io[f"{key}_traj"], f"{key}_traj", **FWD)


def test_latent_mapping_matches_official(checkpoint, io):
    vae = tiny_vae()  # the mapping does not depend on the VAE weights
    assert torch.equal(vae.scale.flatten(), io["vae_scale"]) and torch.equal(vae.bias.flatten(), io["vae_bias"])
    # The official decoder's input (README: for the longest guided sample of the checkpoint as recorded, i.e.
    # with the time embedding its pickled config names), recomputed end to end.
    temb = read_checkpoint(checkpoint)[0]["temb_type"]
    guided = [(steps, cfg_scale) for _, t, steps, cfg_scale in sampler_cases(io) if t == temb and cfg_scale]
    assert guided, f"no guided sample recorded for the checkpoint's temb_type {temb!r}"
    steps, cfg_scale = max(guided)
    x = pushforward(load_network(checkpoint), io["sample_latents"], io["sample_class_onehot"], steps, cfg_scale)
    close(vae.latents_to_raw(x), io["decode_vae_input"], "decode_vae_input", **DECODE)


def test_loss_matches_official(checkpoint, io):
    net = load_network(checkpoint).train().requires_grad_(True)
    groups, size = io["loss_f_st"].shape[:2]
    loss_fn = IMMLoss(**{**LOSS_DEFAULTS, "matrix_size": size})
    draws = dict(u_t=io["loss_u_t"], u_s=io["loss_u_s"], drop_mask=io["loss_label_drop_mask"], noise=io["loss_noise"])
    terms = loss_fn.terms(net, io["loss_images"], io["loss_labels_onehot"], draws)
    for name in ("t", "r", "s"):
        close(terms[name], io[f"loss_{name}"], f"loss_{name}", **TIMES)
    close(terms["labels_drop"], io["loss_labels_drop_onehot"], "loss_labels_drop_onehot", atol=0, rtol=0)
    close(terms["y_t"], io["loss_y_t"], "loss_y_t", **FWD)
    close(terms["y_r"], io["loss_y_r"], "loss_y_r", **FWD)
    close(terms["f_st"].detach(), io["loss_f_st"], "loss_f_st", **F_LOSS)
    close(terms["f_sr"], io["loss_f_sr"], "loss_f_sr", **F_LOSS)
    close(terms["w"], io["loss_kernel_w"], "loss_kernel_w", **LOSS)
    close(terms["wout"], io["loss_wout"], "loss_wout", **LOSS)
    for name in ("inter_sample_sim", "inter_gt_sim", "cross_sim"):
        close(terms[name].detach(), io[f"loss_{name}"], f"loss_{name}", **LOSS)
    close(terms["loss"].detach(), io["loss_value"], "loss_value", **LOSS)
    assert terms["loss"].shape == (groups,) and terms["loss"].requires_grad and not terms["f_sr"].requires_grad


def manifests(folder):
    return sorted(folder.glob("manifest_*.json"))


def test_manifests_strict_load_on_meta_device(folder):
    paths = manifests(folder)
    assert paths
    for path in paths:
        manifest = json.loads(path.read_text())
        with torch.device("meta"):
            net = IMMPrecond(**manifest["network_kwargs"])
        for module, entries in manifest["state_dicts"].items():
            assert module == "ema", f"{path.name}: unexpected module {module}"
            expected = [(k, tuple(shape), dtype) for k, shape, dtype in entries]
            ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()]
            assert ours == expected, f"{path.name}: state dict differs from the release"
            state_dict = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                          for k, shape, dtype in expected}
            net.load_state_dict(state_dict, strict=True, assign=True)
        if "num_elements" in manifest:
            assert sum(v.numel() for v in net.state_dict().values()) == manifest["num_elements"]
        assert net.temb_type == manifest["network_kwargs"]["temb_type"]
