"""Self-training with LoRA (finetune.lora) on a text-to-image pipeline: only the adapters train, θs is θr with them
fused, and θneon written as a LoRA and fused by diffusers' own pipeline loader is the merged θneon folder, weight
for weight — for the diffusers/PEFT file and the kohya file alike."""
import copy
import dataclasses
import json

import pytest
import torch

from hf_diffusers.lora_files import KOHYA_FILE, PEFT_FILE, read_peft, save_peft
from neon.config import FinetuneConfig
from neon.errors import NeonError
from neon.family import get_family
from neon.lora import Lora
from neon.lora_train import DEFAULT_TARGETS, check_lora, read_factors
from neon.merge import merge_state_dicts
from neon.run import save_neon_lora
from neon.selftrain import finetune, lora_path

FAMILY = get_family("text2image")
W = 1.5
LABELS = [0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """θr (a tiny SD pipeline) and the snapshots of a short LoRA self-training on its own samples."""
    out = tmp_path_factory.mktemp("lora")
    theta_r = FAMILY.tiny(seed=3)
    images = FAMILY.sample(theta_r, list(range(len(LABELS))), torch.tensor(LABELS), num_inference_steps=2)
    examples = FAMILY.encode(theta_r, images, torch.tensor(LABELS))
    cfg = FinetuneConfig(lr=1e-2, batch=3, total_images=12, snapshot_every_images=6, log_every_images=6,
                         lora={"rank": 2, "alpha": 4})
    return theta_r, finetune(FAMILY, theta_r, examples, cfg, str(out / "finetune")), out


def _targets(name: str) -> bool:
    return any(name.endswith(f".{t}.weight") for t in DEFAULT_TARGETS)


def test_only_the_adapted_weights_move_and_theta_s_is_theta_r_plus_its_adapters(trained):
    theta_r, snapshots, _ = trained
    r = theta_r.net.state_dict()
    s = FAMILY.load(snapshots[-1]).net.state_dict()
    assert set(s) == set(r)
    moved = {k for k in r if not torch.equal(r[k], s[k])}
    assert moved and all(_targets(k) for k in moved)
    assert len(moved) == sum(1 for k in r if _targets(k))        # every adapted weight trained
    adapters = read_factors(lora_path(snapshots[-1]))
    assert {a.rank for a in adapters.values()} == {2} and {a.scale for a in adapters.values()} == {2.0}
    for name, lora in adapters.items():
        torch.testing.assert_close(s[f"{name}.weight"], r[f"{name}.weight"] + lora.delta(), rtol=0, atol=1e-6)


def _pipeline(theta_r):
    """θr's pipeline over a copy of its UNet (diffusers' LoRA loader changes the network it is given)."""
    from hf_text2image.adapter import _pipeline
    return _pipeline(dataclasses.replace(theta_r, net=copy.deepcopy(theta_r.net)))


@pytest.mark.parametrize("weight_name", [PEFT_FILE, KOHYA_FILE])
def test_the_lora_file_fused_by_diffusers_is_the_merged_theta_neon(trained, tmp_path, weight_name):
    theta_r, snapshots, _ = trained
    save_neon_lora(FAMILY, theta_r, {"theta_s": snapshots[-1], "best": {"w": W}}, str(tmp_path / "neon_lora"))
    merged = merge_state_dicts(theta_r.net.state_dict(), FAMILY.load(snapshots[-1]).net.state_dict(), W)
    pipe = _pipeline(theta_r)
    pipe.load_lora_weights(str(tmp_path / "neon_lora"), weight_name=weight_name, adapter_name="neon")
    pipe.fuse_lora()
    pipe.unload_lora_weights()   # the fused weights stay; the adapter layers go, so the keys are θr's again
    fused = pipe.unet.state_dict()
    assert set(fused) == set(merged)
    for key, want in merged.items():
        got = fused[key]
        assert float((got.double() - want.double()).norm() / want.double().norm()) <= 1e-6, key
    moved = [k for k in merged if not torch.equal(merged[k], theta_r.net.state_dict()[k])]
    assert moved and all(_targets(k) for k in moved)   # w ≠ 0: θneon is not θr


def test_a_strength_dialled_at_load_time_is_another_w(trained, tmp_path):
    """The file at strength k is θr − k·w·ΔW_s: a user tries other w without a new file."""
    theta_r, snapshots, _ = trained
    save_neon_lora(FAMILY, theta_r, {"theta_s": snapshots[-1], "best": {"w": W}}, str(tmp_path / "neon_lora"))
    pipe = _pipeline(theta_r)
    pipe.load_lora_weights(str(tmp_path / "neon_lora"), adapter_name="neon")
    pipe.set_adapters(["neon"], adapter_weights=[0.5])
    pipe.fuse_lora(adapter_names=["neon"])
    pipe.unload_lora_weights()
    half = merge_state_dicts(theta_r.net.state_dict(), FAMILY.load(snapshots[-1]).net.state_dict(), 0.5 * W)
    fused = pipe.unet.state_dict()
    assert max(float((fused[k].double() - v.double()).norm() / v.double().norm()) for k, v in half.items()) <= 1e-6


def test_the_same_seed_gives_the_same_adapters(trained, tmp_path):
    theta_r, snapshots, _ = trained
    images = FAMILY.sample(theta_r, list(range(len(LABELS))), torch.tensor(LABELS), num_inference_steps=2)
    examples = FAMILY.encode(theta_r, images, torch.tensor(LABELS))
    cfg = FinetuneConfig(lr=1e-2, batch=3, total_images=6, log_every_images=6, lora={"rank": 2, "alpha": 4})
    again = finetune(FAMILY, theta_r, examples, cfg, str(tmp_path / "again"))
    first, second = read_factors(lora_path(snapshots[0])), read_factors(lora_path(again[-1]))
    assert all(torch.equal(first[k].down, second[k].down) and torch.equal(first[k].up, second[k].up) for k in first)


@pytest.mark.parametrize("spec, message", [
    ({"rank": 0}, r"finetune.lora.rank: an integer in \[1, 4096\]"),
    ({"rank": 4, "dropout": 0.1}, "finetune.lora: unknown field 'dropout'"),
    ({"alpha": -1}, "finetune.lora.alpha: a positive number"),
    ({"targets": []}, "finetune.lora.targets: a non-empty list"),
    ({"out_rank": 0}, "finetune.lora.out_rank: a rank of at least 1"),
    ([4], "finetune.lora: expected a mapping"),
])
def test_a_bad_lora_field_is_named_in_one_line(spec, message):
    with pytest.raises(NeonError, match=message):
        check_lora(spec)
    assert check_lora({"rank": 8}) == {"rank": 8, "alpha": 8.0, "targets": DEFAULT_TARGETS, "out_rank": None}


def test_targets_that_match_no_module_are_refused(trained, tmp_path):
    theta_r, _, _ = trained
    examples = {"x0": torch.zeros(3, 4, 8, 8), "labels": torch.tensor([0, 1, 2])}
    cfg = FinetuneConfig(lr=1e-2, batch=3, total_images=3, lora={"targets": ["no_such_module"]})
    with pytest.raises(NeonError, match="finetune.lora.targets"):
        finetune(FAMILY, theta_r, examples, cfg, str(tmp_path / "bad"))


@pytest.fixture(scope="module")
def users_lora(tmp_path_factory):
    """θr = the tiny pipeline (seed 3) + a user's rank-2 LoRA (scale 0.5) in diffusers' PEFT layout."""
    base = FAMILY.tiny(seed=3)
    g = torch.Generator().manual_seed(7)
    adapters = {}
    for name, module in base.net.named_modules():
        if name.endswith(tuple(DEFAULT_TARGETS)):
            out_f, in_f = module.weight.shape
            adapters[name] = Lora(torch.randn(2, in_f, generator=g) / in_f ** 0.5, torch.randn(out_f, 2, generator=g),
                                  0.5)
    folder = tmp_path_factory.mktemp("users_lora")
    return base, adapters, save_peft(adapters, str(folder))


def test_a_users_lora_is_fused_into_theta_r_and_self_training_continues_it(users_lora, tmp_path):
    base, adapters, path = users_lora
    theta_r = FAMILY.tiny(seed=3, lora=path)
    for name, lora in adapters.items():
        torch.testing.assert_close(theta_r.net.get_submodule(name).weight,
                                   base.net.get_submodule(name).weight + lora.delta(), rtol=0, atol=1e-6)
    images = FAMILY.sample(theta_r, list(range(len(LABELS))), torch.tensor(LABELS), num_inference_steps=2)
    examples = FAMILY.encode(theta_r, images, torch.tensor(LABELS))
    cfg = FinetuneConfig(lr=1e-2, batch=3, total_images=6, log_every_images=6)   # θr's LoRA sets the rank
    (snapshot,) = finetune(FAMILY, theta_r, examples, cfg, str(tmp_path / "finetune"))
    trained = read_factors(lora_path(snapshot))
    assert set(trained) == set(adapters) and {a.rank for a in trained.values()} == {2}
    assert all(not torch.allclose(trained[k].delta(), adapters[k].delta()) for k in adapters)   # it moved ...
    theta_s = FAMILY.load(snapshot).net
    for name, lora in trained.items():   # ... from θr's adapters, on the base weights
        torch.testing.assert_close(theta_s.get_submodule(name).weight,
                                   base.net.get_submodule(name).weight + lora.delta(), rtol=0, atol=1e-5)

    # θneon's LoRA, on the base: (1+w)·ΔW_r − w·ΔW_s of rank 2 + 2, is the merged θneon once fused
    save_neon_lora(FAMILY, theta_r, {"theta_s": snapshot, "best": {"w": W}}, str(tmp_path / "neon_lora"))
    merged = merge_state_dicts(theta_r.net.state_dict(), theta_s.state_dict(), W)
    pipe = _pipeline(base)
    pipe.load_lora_weights(str(tmp_path / "neon_lora"), weight_name=PEFT_FILE, adapter_name="neon")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    assert max(float((fused[k].double() - v.double()).norm() / v.double().norm()) for k, v in merged.items()) <= 1e-6
    assert {lora.rank for lora in read_peft(str(tmp_path / "neon_lora" / PEFT_FILE)).values()} == {4}

    # asked for rank 2 instead: the best rank-2 ΔW of each (SVD), its relative error written beside and true
    save_neon_lora(FAMILY, theta_r, {"theta_s": snapshot, "best": {"w": W}}, str(tmp_path / "cut"), out_rank=2)
    exact = read_peft(str(tmp_path / "neon_lora" / PEFT_FILE))
    cut = read_peft(str(tmp_path / "cut" / PEFT_FILE))
    errors = json.loads((tmp_path / "cut" / "truncation.json").read_text())["relative_error"]
    assert {lora.rank for lora in cut.values()} == {2} and set(errors) == set(exact)
    for name, lora in exact.items():
        delta = lora.delta().double()
        true_error = float((delta - cut[name].delta().double()).norm() / delta.norm())
        assert 0 < errors[name] and abs(errors[name] - true_error) <= 1e-5


def test_a_lora_for_another_network_is_refused_in_one_line(tmp_path):
    save_peft({"no.such.layer": Lora(torch.zeros(2, 4), torch.zeros(4, 2))}, str(tmp_path))
    with pytest.raises(NeonError, match="adapts 'no.such.layer', which the unet has no layer for"):
        FAMILY.tiny(lora=str(tmp_path / PEFT_FILE))
    with pytest.raises(NeonError, match="not found|no such"):
        FAMILY.tiny(lora=str(tmp_path / "missing.safetensors"))
