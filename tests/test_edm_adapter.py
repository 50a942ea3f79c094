"""The EDM adapter as the Neon core uses it: tiny network, seeded sampling, encode, loss, save/load, configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edm.adapter import EDMFamily
from edm.loss import EDMLoss, reduce_loss
from edm.sampler import SeededNoise
from neon.config import check_args, load_config
from neon.errors import NeonError
from neon.family import Family, get_family
from neon.sampling import generate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/edm_*.yaml"))


@pytest.fixture(scope="module")
def family():
    return EDMFamily()


@pytest.fixture(scope="module")
def cond(family):
    return family.tiny(seed=0, conditional=True)


def test_family_is_registered_and_implements_the_protocol():
    family = get_family("edm")
    assert isinstance(family, EDMFamily) and isinstance(family, Family)
    d = family.train_defaults
    assert (d.optimizer, d.betas, d.eps, d.weight_decay, d.grad_clip) == ("adam", (0.9, 0.999), 1e-8, 0.0, None)


def test_tiny_round_trip_sample_encode_loss_save_load(family, tmp_path):
    bundle = family.tiny(seed=1, conditional=True)
    seeds, labels = [0, 1, 2, 3], torch.tensor([3, 1, 4, 1])
    images = family.sample(bundle, seeds, labels, num_steps=4)
    assert images.dtype == torch.uint8 and images.shape == (4, bundle.resolution, bundle.resolution, 3)

    batch = family.encode(bundle, images, labels)
    assert batch["images"].shape == (4, 3, bundle.resolution, bundle.resolution)
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert torch.equal(batch["labels"], labels)

    bundle.net.train()
    loss = family.loss(bundle, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in bundle.net.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["model.map_augment.weight"].abs().sum() > 0   # the augmentation pipe is on
    bundle.net.eval()

    path = tmp_path / "tiny.pt"
    family.save(bundle, str(path))
    again = family.load(str(path))
    assert again.num_classes == bundle.num_classes and again.resolution == bundle.resolution
    state = bundle.net.state_dict()
    assert all(torch.equal(again.net.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(family.sample(again, seeds, labels, num_steps=4), images)


def test_conditional_model_without_labels_is_an_error(family, cond):
    with pytest.raises(NeonError, match="labels are required"):
        family.sample(cond, [0, 1], None)
    with pytest.raises(NeonError, match="labels are required"):
        family.encode(cond, torch.zeros(2, cond.resolution, cond.resolution, 3, dtype=torch.uint8), None)


def test_bad_labels_are_errors(family, cond):
    with pytest.raises(NeonError, match=r"\[0, 10\)"):
        family.sample(cond, [0, 1], torch.tensor([0, 10]))
    with pytest.raises(NeonError, match="shape"):
        family.sample(cond, [0, 1], torch.tensor([0]))
    uncond = family.tiny(conditional=False)
    with pytest.raises(NeonError, match="unconditional"):
        family.sample(uncond, [0], torch.tensor([0]))


def test_unknown_sampler_argument_is_an_error(family, cond):
    with pytest.raises(NeonError, match="sampler.steps: unknown argument"):
        list(generate(family, cond, [0], np.array([0]), 1, {"steps": 4}))


def test_an_image_depends_on_its_seed_alone(family, cond):
    together = family.sample(cond, [5, 9, 2], torch.tensor([1, 2, 3]), num_steps=3)
    alone = family.sample(cond, [9], torch.tensor([2]), num_steps=3)
    assert (together[1].int() - alone[0].int()).abs().max() <= 1   # float rounding may differ by batch size
    assert torch.equal(SeededNoise([5, 9, 2]).randn([3, 3, 4, 4])[1], SeededNoise([9]).randn([1, 3, 4, 4])[0])


def test_stochastic_sampling_draws_per_image_noise(family, cond):
    args = dict(num_steps=3, S_churn=10, S_max=100)
    together = family.sample(cond, [5, 9], torch.tensor([1, 2]), **args)
    alone = family.sample(cond, [9], torch.tensor([2]), **args)
    deterministic = family.sample(cond, [9], torch.tensor([2]), num_steps=3)
    assert (together[1].int() - alone[0].int()).abs().max() <= 1
    assert not torch.equal(alone, deterministic)


def test_labels_from_seeds_follow_generate_py(family, cond):
    seeds = [0, 17, 2**33 + 5]
    labels = family.labels_from_seeds(cond, seeds)
    for seed, label in zip(seeds, labels):
        g = torch.Generator().manual_seed(seed % (1 << 32))
        torch.randn([cond.net.img_channels, cond.resolution, cond.resolution], generator=g)  # latents first
        assert label == torch.randint(cond.num_classes, size=[], generator=g)
    assert family.labels_from_seeds(family.tiny(conditional=False), seeds) is None


def test_sampling_leaves_the_training_mode_alone(family):
    bundle = family.tiny(seed=2)
    bundle.net.train()
    family.sample(bundle, [0], torch.tensor([0]), num_steps=2)
    assert bundle.net.training


def test_encode_maps_uint8_like_the_training_loop(family, cond):
    r = cond.resolution
    images = torch.full((2, r, r, 3), 255, dtype=torch.uint8)
    images[1] = 0
    out = family.encode(cond, images, torch.tensor([0, 1]))["images"]
    assert torch.equal(out[0], torch.ones(3, r, r)) and torch.equal(out[1], -torch.ones(3, r, r))
    with pytest.raises(NeonError, match="expected uint8"):
        family.encode(cond, images.float(), torch.tensor([0, 1]))


def test_loss_is_the_official_reduction_of_edm_loss(family):
    bundle = family.tiny(seed=5, conditional=False)
    images = torch.rand(3, 3, bundle.resolution, bundle.resolution) * 2 - 1
    torch.manual_seed(9)
    ours = family.loss(bundle, {"images": images}, augment=0)
    torch.manual_seed(9)
    per_element = EDMLoss()(bundle.net, images)
    assert torch.equal(ours, per_element.sum() / 3)
    assert torch.equal(reduce_loss(per_element, "mean"), per_element.mean())
    with pytest.raises(NeonError, match="finetune.loss_args.augmnt: unknown"):
        check_args(family.LOSS_ARGS, {"augmnt": 0.1}, "finetune.loss_args")


def test_load_args_are_refused_for_real_checkpoints(family, tmp_path):
    with pytest.raises(NeonError, match="load_args.conditional: unknown argument"):
        check_args(family.LOAD_ARGS, {"conditional": True}, "load_args")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_and_its_smoke_run_uses_the_tiny_network(path, family):
    config = load_config(str(path))
    assert config.family == "edm" and config.base.startswith("checkpoints/edm-")
    assert config.metrics.detector == "nvidia"
    smoke = load_config(str(path), smoke=True)
    assert smoke.base is None
    bundle = family.tiny(**smoke.load_args)
    assert bundle.conditional == (config.synthetic.labels != "none")
