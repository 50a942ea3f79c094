"""xAR and its KL-16 VAE against the official code's outputs ($NEON_FIXTURES/xar, see its README).

Every size and argument comes from the fixture files (config.json, io.pt, the manifests), so another fixture
set made the same way must pass unchanged. Tolerances are the README's.
"""
import json
import re

import pytest
import torch

from neon.errors import NeonError
from xar import checkpoint
from xar.loss import flow_batch, flow_matching_loss
from xar.model import CONFIGS, XAR, XARConfig, to_cells
from xar.sampler import RecordedNoise, sample_cells, sample_tokens, time_grid, timestep
from xar.vae import AutoencoderKL, config_from_state_dict, posterior, posterior_sample

FORWARD = dict(atol=2e-5, rtol=1e-4)    # network forward values (train_*, sample_callNN_out, vae_*)
LOSS = dict(atol=1e-5, rtol=1e-5)       # train_loss
SAMPLER = dict(atol=1e-4, rtol=1e-4)    # full sampler outputs (sample_cluster_out*, sample_tokens)
UNUSED_ARGS = ("norm_layer", "diffusion_batch_mul")   # accepted by the official constructor, never used


@pytest.fixture(scope="module")
def folder(fixtures):
    return fixtures / "xar"


@pytest.fixture(scope="module")
def io(folder):
    return torch.load(folder / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def xar_cfg(config):
    return XARConfig(**{k: v for k, v in config["xar_constructor"].items() if k not in UNUSED_ARGS})


def _xar_files(folder):
    return sorted(folder.glob("*.pth"))


def _vae_files(folder):
    return sorted(folder.glob("*.ckpt"))


@pytest.fixture(scope="module")
def plain_state_dict(folder):
    """The state dict of the file in the release container (a plain state dict at the top level)."""
    plain = [p for p in _xar_files(folder) if checkpoint.read_xar_state_dict(str(p))[1] == "plain"]
    assert len(plain) == 1, f"expected one plain xAR state dict in {folder}, found {plain}"
    return checkpoint.read_xar_state_dict(str(plain[0]))[0]


@pytest.fixture
def net(xar_cfg, plain_state_dict):
    net = XAR(xar_cfg)
    net.load_state_dict(plain_state_dict, strict=True)
    return net


@pytest.fixture(scope="module")
def vae(folder):
    (path,) = _vae_files(folder)
    return checkpoint.load_vae(str(path))


def close(actual, expected, tol, name):
    err = (actual.double() - expected.double()).abs().max().item()
    assert torch.allclose(actual.double(), expected.double(), **tol), f"{name}: max abs error {err:.3g}"


# -- files ------------------------------------------------------------------------------------------------------

def test_every_fixture_file_is_covered(folder):
    """Each file is read by a test below: README, config.json, io.pt, xAR containers (*.pth), the VAE (*.ckpt),
    manifests. An unknown file means the fixture set grew and these tests need to grow with it."""
    patterns = [r"README\.md", r"config\.json", r"io\.pt", r".*\.pth", r".*\.ckpt", r"manifest_.*\.json"]
    for path in folder.iterdir():
        assert any(re.fullmatch(p, path.name) for p in patterns), f"fixture file {path.name} is not tested"
    assert _xar_files(folder) and _vae_files(folder) and list(folder.glob("manifest_*.json"))


def test_every_xar_container_holds_the_same_weights(folder, plain_state_dict, xar_cfg):
    """Release (plain) and Neon ({'model_ema', 'epoch'}) containers: same tensors, strict load, and the
    architecture read off the weights equals config.json's."""
    untraced = dict(attn_dropout=xar_cfg.attn_dropout, proj_dropout=xar_cfg.proj_dropout,   # not in the weights
                    img_size=xar_cfg.img_size, vae_stride=xar_cfg.vae_stride,
                    label_drop_prob=xar_cfg.label_drop_prob)
    for path in _xar_files(folder):
        sd, _ = checkpoint.read_xar_state_dict(str(path))
        assert list(sd) == list(plain_state_dict)
        assert all(torch.equal(sd[k], plain_state_dict[k]) for k in sd), path.name
        net, _ = checkpoint.load_xar(str(path), **untraced)
        assert net.cfg == xar_cfg, path.name


def test_xar_buffers_are_rebuilt_exactly(xar_cfg, plain_state_dict):
    """The block-causal mask and the RoPE tables our constructor builds equal the official buffers."""
    ours = XAR(xar_cfg).state_dict()
    assert list(ours) == list(plain_state_dict)
    for k, v in ours.items():
        if k == "mask" or ".rope." in k:
            assert torch.equal(v, plain_state_dict[k]), k


def test_vae_config_matches_fixture(vae, config):
    args = config["vae_constructor"]
    assert vae.cfg.embed_dim == args["embed_dim"]
    assert vae.cfg.ch_mult == tuple(args["ch_mult"])
    assert vae.cfg.ch == args["encoder_decoder_ch"]
    assert vae.cfg.num_res_blocks == args["encoder_decoder_num_res_blocks"]
    assert vae.cfg.use_variational == args["use_variational"]


# -- VAE --------------------------------------------------------------------------------------------------------

def test_vae_encode_matches_official(vae, io):
    with torch.no_grad():
        moments = vae.encode(io["vae_images"])
    mean, logvar, std = posterior(moments)
    close(moments, io["vae_moments"], FORWARD, "vae_moments")
    close(mean, io["vae_posterior_mean"], FORWARD, "vae_posterior_mean")
    close(logvar, io["vae_posterior_logvar"], FORWARD, "vae_posterior_logvar")
    close(std, io["vae_posterior_std"], FORWARD, "vae_posterior_std")
    close(posterior_sample(moments, io["vae_sample_noise"]), io["vae_posterior_sample"], FORWARD,
          "vae_posterior_sample")


def test_vae_decode_matches_official(vae, io):
    with torch.no_grad():
        close(vae.decode(io["vae_decode_latents"]), io["vae_decode_out"], FORWARD, "vae_decode_out")


# -- training forward and loss ----------------------------------------------------------------------------------

def _recorded_flow_batch(net, io):
    """The official draws rearranged to our layout: the official rows are cell-major (i*B + b)."""
    B, K = io["train_x0"].shape[0], net.cfg.clusters
    z = io["train_logitnormal_z"].view(K, B).T
    noise = io["train_noise"].transpose(0, 1).reshape(B, K * net.cell_tokens, -1)
    return dict(drop_u=io["train_label_drop_u"], z=z, noise=noise)


def test_training_inputs_match_official(net, io):
    B, K = io["train_x0"].shape[0], net.cfg.clusters
    fb = flow_batch(net, io["train_x0"], io["train_labels"], **_recorded_flow_batch(net, io))
    assert torch.equal(fb.labels, io["train_labels_effective"])
    assert torch.equal(fb.t, io["train_t"].view(K, B).T)
    assert torch.equal(fb.timesteps, io["train_timesteps"].view(K, B).T)
    close(to_cells(io["train_x0"], K), io["train_tokens_clean"], FORWARD, "train_tokens_clean")
    close(fb.x_t, io["train_model_input"], FORWARD, "train_model_input")
    close(fb.target, io["train_target"], FORWARD, "train_target")


def test_training_forward_matches_official(net, io):
    net.train()
    B, K = io["train_x0"].shape[0], net.cfg.clusters
    fb = flow_batch(net, io["train_x0"], io["train_labels"], **_recorded_flow_batch(net, io))
    with torch.no_grad():
        close(net.time_embed(io["train_timesteps"]), io["train_time_emb"], FORWARD, "train_time_emb")
        close(net.class_emb(io["train_labels_effective"]), io["train_class_emb"], FORWARD, "train_class_emb")
        cond = net.condition(fb.labels, fb.timesteps)
        close(cond, io["train_condition"].view(K, B, -1).transpose(0, 1), FORWARD, "train_condition")
        close(net.forward_encoder(fb.x_t, cond), io["train_encoder_out"], FORWARD, "train_encoder_out")
        close(net(fb.x_t, fb.labels, fb.timesteps), io["train_velocity"], FORWARD, "train_velocity")


def test_training_loss_matches_official(net, io, config):
    net.train()
    loss = flow_matching_loss(net, io["train_x0"], io["train_labels"],
                              label_drop_prob=config["train"]["label_drop_prob"], **_recorded_flow_batch(net, io))
    close(loss.detach(), io["train_loss"], LOSS, "train_loss")


# -- sampler ----------------------------------------------------------------------------------------------------

def _calls(io):
    return [(n, io["sample_call_meta"][n].tolist()) for n in range(io["sample_call_meta"].shape[0])]


def test_sampler_network_calls_match_official(net, io):
    """Every recorded call, replayed in order on one KV cache: the integer timesteps (float32 rounding) and
    the returned velocities."""
    net.eval()
    T = net.cell_tokens
    cache = net.new_cache(io["sample_call00_x"].shape[0])
    for n, (cell, step, update_cache, scale_index, *_) in _calls(io):
        x, y, t = (io[f"sample_call{n:02d}_{s}"] for s in ("x", "y", "t"))
        expected_steps = io[f"sample_call{n:02d}_timesteps"]
        steps = torch.tensor([timestep(v) for v in t.tolist()])
        assert torch.equal(steps, expected_steps), f"call {n}: timesteps {steps} != {expected_steps}"
        cells = x.shape[1] // T
        assert bool(update_cache) == (step == 0) and scale_index == cell
        with torch.no_grad():   # official rows are cell-major: (cell c, row r) at c * rows + r
            v = net(x, y, steps.view(cells, -1).T, start=(cell + 1) * T - x.shape[1], cache=cache)
        close(v[:, -T:], io[f"sample_call{n:02d}_out"], FORWARD, f"sample_call{n:02d}_out")


def test_sampler_time_grid_matches_official(io):
    assert torch.equal(time_grid(int(io["sample_num_steps"])), io["sample_t_steps"])


@pytest.mark.parametrize("kv_cache", [True, False])
def test_sampler_replaying_recorded_noise_matches_official(net, io, kv_cache):
    net.eval()
    noise = RecordedNoise(io["sample_noise_latents"], io["sample_noise_eps"])
    args = (net, io["sample_labels"], int(io["sample_num_steps"]), float(io["sample_cfg"]), noise)
    cells = sample_cells(*args, kv_cache=kv_cache)
    for k, cell in enumerate(cells):
        close(cell, io["sample_cluster_out_f64"][k], SAMPLER, f"sample_cluster_out_f64[{k}]")
        close(cell.float(), io["sample_cluster_out"][k], SAMPLER, f"sample_cluster_out[{k}]")
    close(sample_tokens(*args, kv_cache=kv_cache), io["sample_tokens"], SAMPLER, "sample_tokens")


# -- release manifests ------------------------------------------------------------------------------------------

def _release_module(manifest):
    """The release model named in the manifest's `built_with` (the official builder call), on the meta device,
    and the manifest's ordered [key, shape, dtype] entries."""
    built_with = manifest["built_with"]
    names = [name for name in CONFIGS if re.search(rf"\b{name}\(", built_with)]
    with torch.device("meta"):
        if names:
            return XAR(CONFIGS[names[0]]), manifest["state_dict"]
        assert re.search(r"\bAutoencoderKL\(", built_with), f"unknown release builder in {built_with!r}"
        entries = manifest["state_dicts"]["model"]
        shapes = {k: torch.empty(shape, device="meta") for k, shape, _ in entries}
        return AutoencoderKL(config_from_state_dict(shapes)), entries


def test_release_manifests_strict_load_on_meta(folder):
    paths = sorted(folder.glob("manifest_*.json"))
    assert paths
    for path in paths:
        manifest = json.loads(path.read_text())
        module, entries = _release_module(manifest)
        got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in module.state_dict().items()]
        assert got == [list(e) for e in entries], path.name   # same keys, order, shapes, dtypes
        sd = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in entries}
        module.load_state_dict(sd, strict=True, assign=True)
        assert sum(p.numel() for p in module.parameters()) == manifest["num_parameters"], path.name
        assert len(module.state_dict()) == manifest["num_state_dict_entries"], path.name
        for buffer in manifest.get("non_parameter_buffers_in_state_dict", []):
            assert buffer in dict(module.named_buffers()), f"{path.name}: {buffer}"


def test_mismatched_release_checkpoint_is_one_line_error(folder, tmp_path):
    """The tiny weights are not xAR-B: loading them as xar_base names the problem in one line."""
    path = _xar_files(folder)[0]
    with pytest.raises(NeonError) as err:
        checkpoint.load_xar(str(path), model="xar_base")
    assert "\n" not in str(err.value) and "xar_base" in str(err.value)
