"""The xAR family adapter on its tiny random model: seeds, the Neon round trip, containers and errors."""
import argparse
import pickle

import pytest
import torch

from neon.config import check_args
from neon.errors import NeonError
from neon.family import Family, get_family
from xar import checkpoint
from xar.adapter import XARFamily
from xar.loss import flow_batch
from xar.sampler import PerImageNoise, sample_cells

SAMPLER = dict(cfg=2.0, flow_steps=3)   # the fewest steps the official sampler accepts


@pytest.fixture(scope="module")
def family():
    return XARFamily()


@pytest.fixture(scope="module")
def bundle(family):
    return family.tiny("cpu", seed=0)


def _one_line_error(fn):
    with pytest.raises(NeonError) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_family_is_registered_and_follows_the_protocol(family):
    assert isinstance(family, Family)
    assert isinstance(get_family("xar"), XARFamily)


def test_train_defaults_are_the_official_recipe(family):
    """Neon xAR/train_new.py: AdamW betas (0.9, 0.96), wd 0.02, grad clip 1.0, torch.cuda.amp.autocast (fp16)."""
    d = family.train_defaults
    assert (d.optimizer, d.betas, d.weight_decay, d.decay_1d, d.grad_clip, d.autocast) == \
        ("adamw", (0.9, 0.96), 0.02, False, 1.0, "fp16")


def test_same_image_per_seed_at_batch_sizes_1_and_5(family, bundle):
    seeds, labels = [11, 12, 13, 14, 15], torch.tensor([0, 7, 999, 7, 3])
    batch = family.sample(bundle, seeds, labels, **SAMPLER)
    assert batch.shape == (5, bundle.resolution, bundle.resolution, 3) and batch.dtype == torch.uint8
    for i in (0, 3):
        alone = family.sample(bundle, seeds[i:i + 1], labels[i:i + 1], **SAMPLER)
        assert torch.equal(alone[0], batch[i]), f"seed {seeds[i]}"


def test_image_depends_on_seed(family, bundle):
    images = family.sample(bundle, [1, 2], torch.tensor([5, 5]), **SAMPLER)
    assert not torch.equal(images[0], images[1])


def test_kv_cache_equals_recomputing_the_finished_cells(bundle):
    net, labels = bundle.net.eval(), torch.tensor([1, 2, 3])

    def run(kv_cache):
        noise = PerImageNoise([4, 5, 6], net.cell_tokens, net.cfg.vae_embed_dim, 4, "cpu")
        return torch.cat(sample_cells(net, labels, 4, 3.0, noise, kv_cache=kv_cache), dim=1)

    torch.testing.assert_close(run(True), run(False), atol=1e-5, rtol=1e-5)


def test_round_trip_sample_encode_loss_save_load(family, bundle, tmp_path):
    labels = torch.tensor([3, 4])
    images = family.sample(bundle, [0, 1], labels, **SAMPLER)
    examples = family.encode(bundle, images, labels)
    latent = (bundle.net.cfg.vae_embed_dim * 2, bundle.net.cfg.grid, bundle.net.cfg.grid)
    assert examples["moments"].shape == examples["moments_flip"].shape == (2, *latent)
    assert torch.equal(examples["labels"], labels)
    loss = family.loss(bundle, examples)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in bundle.net.parameters())
    bundle.net.zero_grad(set_to_none=True)

    path = tmp_path / "theta.pth"
    family.save(bundle, str(path))
    sd, container = checkpoint.read_xar_state_dict(str(path))
    assert container == "plain" and list(sd) == list(bundle.net.state_dict())
    loaded = family.load(str(path), "cpu")
    assert loaded.info["config"] == bundle.info["config"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), bundle.net.state_dict().values()))
    loaded.helpers["vae"] = bundle.helpers["vae"]   # the tiny VAE has no file of its own here
    assert torch.equal(family.sample(loaded, [0, 1], labels, **SAMPLER), images)


def test_neon_container_loads_and_prefers_model_ema(bundle, tmp_path):
    sd = bundle.net.state_dict()
    checkpoint.save_xar(sd, str(tmp_path / "neon.pth"), container="neon", epoch=3)
    raw = torch.load(tmp_path / "neon.pth", weights_only=True)
    assert set(raw) == {"model_ema", "epoch"} and raw["epoch"] == 3
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"model": other, "model_ema": sd, "epoch": 0}, tmp_path / "train.pth")   # upstream training file
    for name in ("neon.pth", "train.pth"):
        got, container = checkpoint.read_xar_state_dict(str(tmp_path / name))
        assert container == "model_ema" and all(torch.equal(got[k], sd[k]) for k in sd)


def test_upstream_training_checkpoint_with_args_namespace_loads(bundle, tmp_path):
    """upstream util/misc.py save_model: {'model', 'model_ema', 'optimizer', 'epoch', 'args': Namespace}."""
    ema = {k: v.clone() for k, v in bundle.net.state_dict().items()}
    raw = {k: v * 0 if v.is_floating_point() else v for k, v in ema.items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save({"model": raw, "model_ema": ema, "optimizer": opt.state_dict(), "epoch": 4,
                "args": argparse.Namespace(model="xar_base", lr=1e-4)}, tmp_path / "checkpoint-last.pth")
    with pytest.raises(pickle.UnpicklingError):  # weights-only torch.load (the reader before) refuses the Namespace
        torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    got, container = checkpoint.read_xar_state_dict(str(tmp_path / "checkpoint-last.pth"))
    assert container == "model_ema" and list(got) == list(ema)
    assert all(torch.equal(got[k], ema[k]) for k in ema)


def test_save_is_atomic_and_leaves_no_temporary_files(bundle, tmp_path):
    checkpoint.save_xar(bundle.net.state_dict(), str(tmp_path / "a.pth"))
    checkpoint.save_xar(bundle.net.state_dict(), str(tmp_path / "a.pth"))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]


def test_mismatched_checkpoint_is_a_one_line_error(family, bundle, tmp_path):
    sd = dict(bundle.net.state_dict())
    checkpoint.save_xar(sd, str(tmp_path / "tiny.pth"))
    assert "xar_large" in _one_line_error(lambda: family.load(str(tmp_path / "tiny.pth"), model="xar_large"))
    del sd["pred.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    assert "pred.bias" in _one_line_error(lambda: family.load(str(tmp_path / "broken.pth")))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    _one_line_error(lambda: family.load(str(tmp_path / "other.pth")))
    _one_line_error(lambda: family.load(str(tmp_path / "missing.pth")))
    torch.save(bundle.net.state_dict(), tmp_path / "net.pth")
    _one_line_error(lambda: family.load(str(tmp_path / "net.pth"), vae_path=str(tmp_path / "net.pth")))


def test_bad_sampler_input_is_a_one_line_error(family, bundle):
    _one_line_error(lambda: family.sample(bundle, [0], None, **SAMPLER))                  # conditional model
    _one_line_error(lambda: family.sample(bundle, [0, 1], torch.tensor([1]), **SAMPLER))
    _one_line_error(lambda: family.sample(bundle, [0], torch.tensor([1000]), **SAMPLER))  # 1000 is the null class
    _one_line_error(lambda: family.sample(bundle, [0], torch.tensor([1]), cfg=2.0, flow_steps=2))
    _one_line_error(lambda: family.encode(bundle, torch.zeros(1, 8, 8, 3, dtype=torch.uint8), torch.tensor([1])))
    _one_line_error(lambda: family.encode(bundle, torch.zeros(1, 32, 32, 3, dtype=torch.uint8), None))


def test_loss_args_override_the_official_values(family, bundle):
    net = bundle.net
    x0, labels = torch.randn(4, net.cfg.vae_embed_dim, net.cfg.grid, net.cfg.grid), torch.tensor([1, 2, 3, 4])
    assert (flow_batch(net, x0, labels, label_drop_prob=1.0).labels == net.null_label).all()
    assert torch.equal(flow_batch(net, x0, labels, label_drop_prob=0.0).labels, labels)
    t = flow_batch(net, x0, labels, logit_mean=-30.0).t
    assert (t < 1e-6).all()
    examples = {"moments": torch.zeros(2, 32, 16, 16), "moments_flip": torch.zeros(2, 32, 16, 16),
                "labels": torch.tensor([1, 2])}
    _one_line_error(lambda: check_args(family.LOSS_ARGS, {"label_dropout": 0.5}, "finetune.loss_args"))
    assert torch.isfinite(family.loss(bundle, examples, label_drop_prob=0.5, logit_std=0.5))
