"""The IMM family through the core's adapter protocol, on the tiny network."""
from pathlib import Path

import pytest
import torch

from imm.adapter import IMMFamily
from imm.loss import IMMLoss
from imm.sampler import initial_latents, sample_latents
from neon.config import check_args, load_config
from neon.errors import NeonError
from neon.family import Family, get_family

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "imm_in256.yaml"


@pytest.fixture(scope="module")
def family():
    return IMMFamily()


@pytest.fixture(scope="module")
def bundle(family):
    return family.tiny(seed=0)


def test_family_is_registered_and_implements_the_protocol(family):
    assert isinstance(family, Family)
    assert isinstance(get_family("imm"), IMMFamily)


def test_sample_shape_and_range(family, bundle):
    images = family.sample(bundle, [0, 1], torch.tensor([3, 9]), steps=1, cfg=1.5)
    assert images.dtype == torch.uint8 and images.shape == (2, bundle.resolution, bundle.resolution, 3)
    assert images.float().std() > 0


@pytest.mark.parametrize("steps,cfg", [(8, 1.5), (2, None)])
def test_same_image_per_seed_at_batch_sizes_1_and_3(family, bundle, steps, cfg):
    """Every random draw comes from the image's seed, so batch 1 and batch 3 give the same image: bit for bit
    through the family's batch-invariant mode (image by image), and to float32 rounding through the batched
    network (GEMM / conv kernels depend on the batch size)."""
    seeds, labels = [11, 12, 13], torch.tensor([0, 5, 9])
    assert torch.equal(initial_latents(bundle.net, seeds)[1], initial_latents(bundle.net, [12])[0])
    latents = sample_latents(bundle.net, seeds, labels, steps=steps, cfg=cfg)
    images = family.sample(bundle, seeds, labels, steps=steps, cfg=cfg, batch_invariant=True)
    batched = family.sample(bundle, seeds, labels, steps=steps, cfg=cfg)
    assert (batched.int() - images.int()).abs().max() <= 1
    for i, seed in enumerate(seeds):
        alone = sample_latents(bundle.net, [seed], labels[i:i + 1], steps=steps, cfg=cfg)
        torch.testing.assert_close(alone[0], latents[i], atol=1e-5, rtol=0, msg=f"seed {seed}")
        image = family.sample(bundle, [seed], labels[i:i + 1], steps=steps, cfg=cfg)[0]
        assert torch.equal(image, images[i]), f"seed {seed}"


def test_image_depends_on_seed_label_and_guidance(family, bundle):
    base = family.sample(bundle, [1], torch.tensor([2]))
    assert not torch.equal(base, family.sample(bundle, [2], torch.tensor([2])))
    assert not torch.equal(base, family.sample(bundle, [1], torch.tensor([3])))
    assert not torch.equal(base, family.sample(bundle, [1], torch.tensor([2]), cfg=3.0))


def test_conditional_bundle_refuses_missing_or_bad_labels(family, bundle):
    with pytest.raises(NeonError, match="class-conditional"):
        family.sample(bundle, [0, 1], None)
    with pytest.raises(NeonError, match="labels must lie"):
        family.sample(bundle, [0], torch.tensor([bundle.num_classes]))
    with pytest.raises(NeonError, match="shape"):
        family.sample(bundle, [0, 1], torch.tensor([1]))
    with pytest.raises(NeonError, match="steps"):
        family.sample(bundle, [0], torch.tensor([1]), steps=0)


def test_encode_gives_posterior_moments_that_the_loss_trains_on(family):
    bundle = family.tiny(seed=1)
    labels = torch.arange(8) % bundle.num_classes
    images = family.sample(bundle, list(range(8)), labels, steps=1)
    examples = family.encode(bundle, images, labels)
    latent = bundle.net.img_resolution
    assert examples["moments"].shape == (8, 2 * bundle.net.img_channels, latent, latent)
    assert (examples["moments"][:, bundle.net.img_channels:] > 0).all()  # the std half
    assert torch.equal(examples["labels"], labels)
    bundle.net.train().requires_grad_(True)
    loss = family.loss(bundle, examples)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    grads = [p.grad for n, p in bundle.net.named_parameters() if not n.endswith("pos_embed")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_encode_refuses_wrong_images(family, bundle):
    with pytest.raises(NeonError, match="uint8"):
        family.encode(bundle, torch.zeros(1, 8, 8, 3, dtype=torch.uint8), torch.tensor([0]))


def test_loss_reads_loss_args_and_checks_the_group_size(family):
    bundle = family.tiny(seed=2)
    batch = {"moments": torch.rand(6, 8, 4, 4), "labels": torch.arange(6)}
    with pytest.raises(NeonError, match="multiple of the group size 4"):
        family.loss(bundle, batch)
    assert torch.isfinite(family.loss(bundle, batch, matrix_size=3))
    with pytest.raises(NeonError, match="loss_args.kernel: unknown argument"):
        check_args(family.LOSS_ARGS, {"kernel": "gaussian"}, "finetune.loss_args")


@pytest.mark.parametrize("mode", ["uniform", "lognormal"])
def test_loss_times_are_ordered(family, mode):
    net = family.tiny().net
    loss_fn = IMMLoss(sample_t_mode=mode)
    torch.manual_seed(0)
    t, r, s = loss_fn.sample_times(net, loss_fn.draw_uniform(4096, "cpu"), loss_fn.draw_uniform(4096, "cpu"))
    assert (s <= r).all() and (r < t).all() and (t <= net.T + 1e-12).all() and (s >= net.eps).all()
    assert ((t - r >= loss_fn.min_tr_gap - 1e-12) | (r == s)).all()  # or r = s when s lies within the gap


def test_target_branch_carries_no_gradient(family):
    bundle = family.tiny()
    net = bundle.net.train().requires_grad_(True)
    y, labels = torch.randn(4, 4, 4, 4) * 0.5, torch.eye(10)[:4]
    terms = IMMLoss().terms(net, y, labels)
    assert terms["f_st"].requires_grad and not terms["f_sr"].requires_grad


def test_config_validates():
    cfg = load_config(str(CONFIG))
    assert cfg.family == "imm" and cfg.base and cfg.load_args["vae_path"]
    smoke = load_config(str(CONFIG), smoke=True)
    assert smoke.base is None and smoke.load_args["vae_path"] == "tiny" and smoke.synthetic.per_class <= 2
