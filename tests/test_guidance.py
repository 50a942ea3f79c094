"""θs as a sampling-time guide (SIMS / autoguidance form): every network evaluation of every family's sampler gives
(1+ω)·out_θr − ω·out_θs; ω = 0 never runs the guide; `neon sample --guide` sets it up from a checkpoint."""
import contextlib

import numpy as np
import pytest
import torch

from neon.cli import main
from neon.errors import NeonError
from neon.family import get_family
from neon.guidance import active_guide, mix, with_guide

W = 0.75   # ω of the tests: any value away from 0

# name -> (family, tiny() arguments, sampler arguments, labels for seeds [0, 1] or None, the module that runs once
# per network evaluation). Small step counts: the guidance acts at every evaluation, whatever their number.
CASES = {
    "edm": ("edm", {}, dict(num_steps=3), [1, 7], lambda net: net),
    "imm": ("imm", {}, dict(steps=2, cfg=1.5), [2, 5], lambda net: net.model),
    "xar": ("xar", {}, dict(flow_steps=3, cfg=2.0), [3, 4], lambda net: net),
    "var": ("var", {}, dict(cfg=1.5), [6, 0], lambda net: net.head),
    "diffusers-unet": ("diffusers", {}, dict(num_inference_steps=3), None, lambda net: net),
    "diffusers-dit": ("diffusers", dict(model="dit"), dict(num_inference_steps=2, guidance_scale=4.0), [9, 11],
                      lambda net: net),
}
SEEDS = [0, 1]


def _setup(name, guide_seed=1):
    """(family, θr bundle, the same bundle with a θs of other weights as guide, sampler args, labels, counted)."""
    family_name, tiny, sampler, labels, counted = CASES[name]
    family = get_family(family_name)
    bundle = family.tiny(seed=0, **tiny)
    theta_s = family.tiny(seed=guide_seed, **tiny).net.state_dict()
    labels = None if labels is None else torch.tensor(labels) % bundle.num_classes
    return family, bundle, with_guide(bundle, theta_s), sampler, labels, counted


@contextlib.contextmanager
def _count_calls(*modules):
    """A list whose i-th entry counts the forward calls of modules[i] inside the block."""
    counts = [0] * len(modules)
    hooks = []
    for i, m in enumerate(modules):
        def hook(module, args, i=i):
            counts[i] += 1
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


# -- the core helper ---------------------------------------------------------------------------------------

def test_with_guide_copies_the_architecture_with_theta_s_weights_and_leaves_the_bundle_alone():
    family = get_family("edm")
    bundle = family.tiny(seed=0)
    theta_s = family.tiny(seed=1).net.state_dict()
    guided = with_guide(bundle, theta_s)
    assert bundle.guide is None and guided.net is bundle.net
    assert guided.guide is not bundle.net and type(guided.guide) is type(bundle.net)
    assert not guided.guide.training and not any(p.requires_grad for p in guided.guide.parameters())
    for key, value in guided.guide.state_dict().items():
        assert torch.equal(value, theta_s[key]), key
    assert not torch.equal(bundle.net.state_dict()[key], theta_s[key])


def test_a_guide_of_another_architecture_is_one_line_naming_it():
    family = get_family("edm")
    other = family.tiny(seed=0, conditional=False).net.state_dict()
    with pytest.raises(NeonError, match="^snapshot.pt: ") as info:
        with_guide(family.tiny(seed=0), other, "snapshot.pt")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["edm", "var"])
def test_a_nonzero_guide_scale_without_a_guide_is_one_line(name):
    family, bundle, _, sampler, labels, _ = _setup(name)
    with pytest.raises(NeonError, match="guide_scale=0.5: no guide network") as info:
        family.sample(bundle, SEEDS, labels, guide_scale=0.5, **sampler)
    assert "\n" not in str(info.value)
    assert active_guide(bundle, 0.0) is None


def test_mix_is_the_extrapolation_away_from_the_guide():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(mix(a, b, 0.5), 1.5 * a - 0.5 * b)
    assert torch.equal(mix(a, a, 3.0), a)


# -- every family's sampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_guide_scale_zero_gives_theta_r_images_byte_for_byte(name):
    family, bundle, guided, sampler, labels, _ = _setup(name)
    assert torch.equal(family.sample(guided, SEEDS, labels, guide_scale=0.0, **sampler),
                       family.sample(bundle, SEEDS, labels, **sampler))


@pytest.mark.parametrize("name", CASES)
def test_guide_scale_zero_never_runs_the_guide(name):
    family, _, guided, sampler, labels, counted = _setup(name)
    with _count_calls(counted(guided.net), counted(guided.guide)) as counts:
        family.sample(guided, SEEDS, labels, guide_scale=0.0, **sampler)
    assert counts[0] > 0 and counts[1] == 0


@pytest.mark.parametrize("name", CASES)
def test_a_nonzero_guide_scale_doubles_the_network_evaluations(name):
    family, bundle, guided, sampler, labels, counted = _setup(name)
    with _count_calls(counted(bundle.net)) as alone:
        family.sample(bundle, SEEDS, labels, **sampler)
    with _count_calls(counted(guided.net), counted(guided.guide)) as both:
        family.sample(guided, SEEDS, labels, guide_scale=W, **sampler)
    assert alone[0] > 0 and both == [alone[0], alone[0]]


@pytest.mark.parametrize("name", CASES)
def test_a_guide_with_other_weights_changes_the_images(name):
    family, bundle, guided, sampler, labels, _ = _setup(name)
    assert not torch.equal(family.sample(guided, SEEDS, labels, guide_scale=W, **sampler),
                           family.sample(bundle, SEEDS, labels, **sampler))


@pytest.mark.parametrize("name", CASES)
def test_a_guide_with_theta_r_weights_gives_theta_r_images(name):
    family, bundle, _, sampler, labels, _ = _setup(name)
    itself = with_guide(bundle, bundle.net.state_dict())
    guided = family.sample(itself, SEEDS, labels, guide_scale=W, **sampler)
    plain = family.sample(bundle, SEEDS, labels, **sampler)
    assert (guided.int() - plain.int()).abs().max() <= 1   # float rounding at most: one uint8 step


# -- the mixing at one network evaluation, per family ------------------------------------------------------

def _assert_mixed(guided, out_r, out_s):
    assert not torch.allclose(out_r, out_s)   # two different networks, or the check below proves nothing
    torch.testing.assert_close(guided, (1 + W) * out_r - W * out_s)


def _two_nets(name):
    _, bundle, guided, _, labels, _ = _setup(name)
    return bundle, guided.net, guided.guide, labels


def test_edm_denoiser_is_mixed_at_every_evaluation():
    from edm.sampler import guided_denoiser
    bundle, r, s, labels = _two_nets("edm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, r.img_channels, r.img_resolution, r.img_resolution, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor(1.7, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(labels, bundle.num_classes).float()
    with torch.no_grad():
        guided = guided_denoiser(r, onehot, s, W)(x, sigma)
        _assert_mixed(guided, r(x, sigma, onehot).double(), s(x, sigma, onehot).double())


def test_imm_flow_map_output_is_mixed_after_each_networks_cfg():
    from imm.sampler import guided_output, network_output, one_hot
    bundle, r, s, labels = _two_nets("imm")
    cfg = CASES["imm"][2]["cfg"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, r.img_channels, r.img_resolution, r.img_resolution, generator=g, dtype=torch.float64)
    t, t_next = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    y = one_hot(labels, bundle.num_classes)
    with torch.no_grad():
        _assert_mixed(guided_output(r, x, t, t_next, y, cfg, s, W),
                      network_output(r, x, t, t_next, y, cfg), network_output(s, x, t, t_next, y, cfg))


def test_xar_drift_is_mixed_after_each_networks_cfg():
    from xar.sampler import drift, guided_drift
    _, r, s, labels = _two_nets("xar")
    cfg_k, k, t = 2.0, 1, 0.6
    g = torch.Generator().manual_seed(0)
    shape = (2, r.cell_tokens, r.cfg.vae_embed_dim)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    context = [torch.randn(shape, generator=g)]     # cell 0, finished; no cache: it is fed at every call
    y = torch.cat([labels, torch.full_like(labels, r.null_label)])
    with torch.no_grad():
        _assert_mixed(guided_drift(r, x, y, k, t, context, [None, None], cfg_k, None, s, W),
                      drift(r, x, y, k, t, context, None, cfg_k, None),
                      drift(s, x, y, k, t, context, None, cfg_k, None))


def test_var_logits_are_mixed_after_each_networks_cfg():
    from var.sampler import Branch, guided_logits
    _, r, s, labels = _two_nets("var")
    pn, t = r.patch_nums[0], 1.5
    with torch.no_grad():
        guided = guided_logits([Branch(r, labels), Branch(s, labels)], pn, t, W)
        _assert_mixed(guided, Branch(r, labels).logits(pn, t), Branch(s, labels).logits(pn, t))


def test_diffusers_unet_model_output_is_mixed():
    from hf_diffusers.sampler import unet_output
    _, r, s, _ = _two_nets("diffusers-unet")
    g = torch.Generator().manual_seed(0)
    size = r.config.sample_size
    x = torch.randn(2, r.config.in_channels, size, size, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        _assert_mixed(unet_output(r, x, t, None, s, W), r(x, t).sample, s(x, t).sample)


def test_diffusers_dit_model_output_is_mixed_after_each_networks_cfg():
    from hf_diffusers.sampler import dit_output, guided_dit_output
    _, r, s, labels = _two_nets("diffusers-dit")
    scale = CASES["diffusers-dit"][2]["guidance_scale"]
    g = torch.Generator().manual_seed(0)
    size = r.config.sample_size
    half = torch.randn(2, r.config.in_channels, size, size, generator=g)
    x = torch.cat([half, half])
    y = torch.cat([labels, torch.full_like(labels, r.config.num_embeds_ada_norm)])
    steps = torch.tensor([400] * 4)
    with torch.no_grad():
        _assert_mixed(guided_dit_output(r, x, steps, y, scale, s, W),
                      dit_output(r, x, steps, y, scale), dit_output(s, x, steps, y, scale))


# -- neon sample --guide -------------------------------------------------------------------------------------

def test_neon_sample_with_a_guide_checkpoint_gives_the_guided_images(tmp_path):
    family = get_family("edm")
    ckpt = tmp_path / "theta_s.pt"
    family.save(family.tiny(seed=1), str(ckpt))
    out = tmp_path / "guided.npz"
    main(["sample", "--family", "edm", "--tiny", "--seeds", "0-2", "--out", str(out), "--guide", str(ckpt),
          "--arg", f"guide_scale={W}", "--arg", "num_steps=3"])
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    guided = with_guide(family.tiny(), family.tiny(seed=1).net.state_dict())
    expected = family.sample(guided, [0, 1, 2], torch.from_numpy(labels), guide_scale=W, num_steps=3)
    assert np.array_equal(images, expected.numpy())
    plain = family.sample(family.tiny(), [0, 1, 2], torch.from_numpy(labels), num_steps=3)
    assert not np.array_equal(images, plain.numpy())


def test_neon_sample_refuses_a_guide_scale_without_a_guide_before_writing(tmp_path, capsys):
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit):
        main(["sample", "--family", "edm", "--tiny", "--seeds", "0-1", "--out", str(out),
              "--arg", "guide_scale=0.5", "--arg", "num_steps=3"])
    err = capsys.readouterr().err.strip()
    assert "guide_scale=0.5: no guide network" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_neon_sample_refuses_a_guide_of_another_network_naming_the_file(tmp_path, capsys):
    family = get_family("edm")
    ckpt = tmp_path / "other.pt"
    family.save(family.tiny(seed=1, conditional=False), str(ckpt))
    with pytest.raises(SystemExit):
        main(["sample", "--family", "edm", "--tiny", "--seeds", "0-1", "--out", str(tmp_path / "s.npz"),
              "--guide", str(ckpt), "--arg", "guide_scale=0.5"])
    err = capsys.readouterr().err.strip()
    assert f"--guide {ckpt}: " in err and "\n" not in err
    assert not (tmp_path / "s.npz").exists()


def test_a_guide_copied_from_a_compiled_network_does_not_keep_theta_rs_compiled_forward():
    from neon import fastpaths
    family = get_family("edm")
    bundle = family.tiny(seed=0)
    with fastpaths.compiled(bundle.net, "eager"):   # leaves θr's compiled forward in its cache
        pass
    guided = with_guide(bundle, family.tiny(seed=1).net.state_dict())
    x = torch.randn(1, 3, bundle.resolution, bundle.resolution)
    sigma, label = torch.tensor(2.0), torch.eye(bundle.num_classes)[:1]
    with torch.no_grad(), fastpaths.compiled(guided.guide, "eager"):
        compiled = guided.guide(x, sigma, label)
    with torch.no_grad():
        torch.testing.assert_close(compiled, guided.guide(x, sigma, label))
        assert not torch.allclose(compiled, bundle.net(x, sigma, label))
