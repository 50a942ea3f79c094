"""The diffusers family on tiny pipelines built from configs (no network): images equal the real pipelines', the
training objective is the scripts', pipeline folders are saved, loaded and merged as diffusers reads them."""
import dataclasses
import filecmp
import json
import os
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
import yaml

from neon.checkpoint import load_state_dict
from neon.config import FinetuneConfig, check_args
from neon.errors import NeonError
from neon.family import get_family
from neon.images import save_images_npz
from neon.merge import merge_files, merge_tensor
from neon.pipeline_folder import MARKER
from neon.selftrain import encode_examples, finetune

STEPS = 4   # denoising steps of the equality tests: every code path of a loop, seconds on CPU


@pytest.fixture(scope="module")
def family():
    torch.set_num_threads(1)
    return get_family("diffusers")


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pipeline_uint8(images: np.ndarray) -> np.ndarray:
    """The pipelines' output_type="pil" pixels (numpy_to_pil), from their output_type="np" floats."""
    return (images * 255).round().astype("uint8")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler,kwargs", [("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 0.7})])
def test_images_equal_the_ddpm_and_ddim_pipelines_for_the_same_generators(family, scheduler, kwargs):
    bundle = family.tiny(scheduler=scheduler, seed=1)
    seeds = [3, 11, 12]
    pipe = _quiet(getattr(diffusers, bundle.info["pipeline"])(unet=bundle.net, scheduler=bundle.info["scheduler"]))
    ref = pipe(batch_size=len(seeds), generator=_generators(seeds), num_inference_steps=STEPS, output_type="np",
               **kwargs).images
    ours = family.sample(bundle, seeds, None, num_inference_steps=STEPS, **kwargs)
    assert ours.dtype == torch.uint8 and ours.shape == (len(seeds), bundle.resolution, bundle.resolution, 3)
    assert np.array_equal(ours.numpy(), _pipeline_uint8(ref))
    assert ours.float().std() > 10   # not a constant image


def test_images_equal_the_dit_pipeline_with_guidance(family):
    bundle = family.tiny(model="dit", seed=2)
    seeds, labels = [5, 6], [7, bundle.num_classes - 1]
    pipe = _quiet(diffusers.DiTPipeline(transformer=bundle.net, vae=bundle.helpers["vae"],
                                        scheduler=bundle.info["scheduler"]))
    for scale in (3.0, 1.0):   # guided, and guidance off
        ref = pipe(class_labels=labels, guidance_scale=scale, generator=_generators(seeds),
                   num_inference_steps=STEPS, output_type="np").images
        ours = family.sample(bundle, seeds, torch.tensor(labels), num_inference_steps=STEPS, guidance_scale=scale)
        assert np.array_equal(ours.numpy(), _pipeline_uint8(ref)), scale


def test_class_conditional_unet_uses_its_labels_and_refuses_none(family):
    bundle = family.tiny(num_classes=4, seed=3)
    assert bundle.num_classes == 4
    a = family.sample(bundle, [1, 1], torch.tensor([0, 3]), num_inference_steps=STEPS)
    assert not torch.equal(a[0], a[1])   # same seed, other class
    with pytest.raises(NeonError, match="class-conditional"):
        family.sample(bundle, [1], None, num_inference_steps=STEPS)
    with pytest.raises(NeonError, match=r"labels must lie in \[0, 4\)"):
        family.sample(bundle, [1], torch.tensor([4]), num_inference_steps=STEPS)


def test_an_image_depends_on_its_seed_not_on_its_batch(family):
    bundle = family.tiny(seed=4)
    both = family.sample(bundle, [8, 9], None, num_inference_steps=STEPS)
    alone = family.sample(bundle, [9], None, num_inference_steps=STEPS)
    assert (both[1].int() - alone[0].int()).abs().max() <= 1   # the same draws; only BLAS rounding may differ


def test_unknown_sampler_argument_is_one_line(family):
    bundle = family.tiny()
    with pytest.raises(NeonError, match="--arg num_steps: unknown argument"):
        check_args(family.SAMPLER_ARGS, {"num_steps": 3}, "--arg")   # what the CLI and the config check
    with pytest.raises(NeonError, match="takes no eta"):
        family.sample(bundle, [0], None, num_inference_steps=2, eta=0.5)   # DDPM's step has no eta


# -- the training objective -----------------------------------------------------------------------------------

def _expected_loss(bundle, batch, seed):
    """The scripts' objective written out from alphas_cumprod: x_t = √ᾱ x0 + √(1−ᾱ) ε, target by prediction_type."""
    sched = bundle.info["scheduler"]
    x0 = batch["x0"]
    torch.manual_seed(seed)
    noise = torch.randn_like(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],))
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = bundle.net(x_t, t, class_labels=batch.get("labels")).sample
    target = {"epsilon": noise, "sample": x0, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0}
    return ((out - target[sched.config.prediction_type]) ** 2).mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_the_diffusers_objective_for_each_prediction_type(family, prediction_type):
    bundle = family.tiny(num_classes=3, prediction_type=prediction_type, seed=5)
    images = family.sample(bundle, [0, 1, 2], torch.tensor([0, 1, 2]), num_inference_steps=2)
    batch = family.encode(bundle, images, torch.tensor([0, 1, 2]))
    assert batch["x0"].shape == (3, 3, bundle.resolution, bundle.resolution) and batch["x0"].abs().max() <= 1
    torch.manual_seed(17)
    loss = family.loss(bundle, batch)
    assert torch.allclose(loss, _expected_loss(bundle, batch, 17), rtol=1e-5)


def test_loss_settings_come_as_keywords(family):
    bundle = family.tiny(seed=6)
    batch = family.encode(bundle, family.sample(bundle, [0, 1], None, num_inference_steps=2), None)
    torch.manual_seed(3)
    plain = family.loss(bundle, batch)
    torch.manual_seed(3)
    weighted = family.loss(bundle, batch, snr_gamma=0.5)
    torch.manual_seed(3)
    assert torch.equal(family.loss(bundle, batch, snr_gamma=0.5), weighted) and not torch.equal(plain, weighted)
    with pytest.raises(NeonError, match="finetune.loss_args.gamma: unknown argument"):
        check_args(family.LOSS_ARGS, {"gamma": 1}, "finetune.loss_args")


def test_dit_trains_on_vae_latents(family):
    bundle = family.tiny(model="dit", seed=7)
    images = family.sample(bundle, [0, 1], torch.tensor([1, 2]), num_inference_steps=2)
    batch = family.encode(bundle, images, torch.tensor([1, 2]))
    latent = bundle.net.config.sample_size
    assert batch["x0"].shape == (2, bundle.net.config.in_channels, latent, latent)
    bundle.net.train()   # label dropout on, as in training
    assert torch.isfinite(family.loss(bundle, batch))


# -- pipeline folders -------------------------------------------------------------------------------------------

def _perturbed(bundle, seed):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in bundle.net.state_dict().items()}
    net = type(bundle.net).from_config(bundle.net.config)
    net.load_state_dict(state)
    return dataclasses.replace(bundle, net=net.eval())


def test_a_saved_folder_loads_with_from_pretrained_and_gives_the_same_images(family, tmp_path):
    bundle = family.tiny(num_classes=3, scheduler="DDIMScheduler", seed=8)
    family.save(bundle, str(tmp_path / "pipe"))
    assert not [n for n in os.listdir(tmp_path) if n != "pipe"], "no temporary left beside the folder"
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(pipe).__name__ == "DDIMPipeline"
    state = bundle.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pipe.unet.state_dict().items())
    again = family.load(str(tmp_path / "pipe"))
    labels = torch.tensor([0, 2])
    assert torch.equal(family.sample(again, [4, 5], labels, num_inference_steps=STEPS),
                       family.sample(bundle, [4, 5], labels, num_inference_steps=STEPS))


def _folder_files(root):
    """The pipeline's files, without the list of them that Neon keeps in every folder it writes."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if f != MARKER)


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_merge_of_two_folders_loads_with_from_pretrained_and_equals_the_extrapolation(family, tmp_path, shard):
    base = family.tiny(seed=9)
    ref = tmp_path / "ref"
    pipe = diffusers.DDPMPipeline(unet=base.net, scheduler=base.info["scheduler"])
    pipe.save_pretrained(str(ref), safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    theta_r = family.load(str(ref))
    family.save(_perturbed(theta_r, 10), str(tmp_path / "synth"))   # θs: a copy of ref with other weights
    assert _folder_files(tmp_path / "synth") == _folder_files(ref)
    w = 0.75
    merge_files(str(ref), str(tmp_path / "synth"), w, str(tmp_path / "neon"))
    assert _folder_files(tmp_path / "neon") == _folder_files(ref)
    weights = [f for f in _folder_files(ref) if f.endswith(".safetensors")]
    assert (len(weights) > 1) == (shard is not None)   # the sharded case really has shards
    for name in _folder_files(ref):
        if not name.endswith(".safetensors"):
            assert filecmp.cmp(ref / name, tmp_path / "neon" / name, shallow=False), name
    merged = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "neon")).unet.state_dict()
    r, s = load_state_dict(str(ref)), load_state_dict(str(tmp_path / "synth"))
    assert set(merged) == set(r)
    for k, v in merged.items():
        assert torch.equal(v, merge_tensor(r[k], s[k], w)), k
    k = next(k for k in r if r[k].is_floating_point() and not torch.equal(r[k], s[k]))
    assert torch.allclose(merged[k], (1 + w) * r[k] - w * s[k], atol=1e-6)


def test_the_ema_component_is_the_merged_network(family, tmp_path):
    bundle = family.tiny(seed=11)
    folder = tmp_path / "pipe"
    family.save(bundle, str(folder))
    ema = _perturbed(bundle, 12).net
    ema.save_pretrained(str(folder / "unet_ema"), safe_serialization=True)
    loaded = family.load(str(folder))
    assert loaded.info["component"] == "unet_ema"
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.net.state_dict().items())
    family.save(_perturbed(loaded, 13), str(tmp_path / "out"))
    for name in ("unet/diffusion_pytorch_model.safetensors", "model_index.json"):
        assert filecmp.cmp(folder / name, tmp_path / "out" / name, shallow=False), name
    assert not filecmp.cmp(folder / "unet_ema/diffusion_pytorch_model.safetensors",
                           tmp_path / "out/unet_ema/diffusion_pytorch_model.safetensors", shallow=False)


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(family, tmp_path):
    from neon import paths
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()   # a PID that no longer runs
    stale = tmp_path / os.path.basename(paths.temp_path(str(tmp_path / "pipe"))).replace(
        f"-{os.getpid()}", f"-{dead.pid}")
    (stale / "unet").mkdir(parents=True)
    family.save(family.tiny(seed=17), str(tmp_path / "pipe"))
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
    family.save(family.tiny(seed=18), str(tmp_path / "pipe"))   # replacing an existing folder leaves nothing else
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_bad_folders_are_one_line(family, tmp_path):
    with pytest.raises(NeonError, match="not a diffusers pipeline folder"):
        family.load(str(tmp_path))
    bundle = family.tiny(seed=14)
    family.save(bundle, str(tmp_path / "pipe"))
    os.remove(tmp_path / "pipe/unet/diffusion_pytorch_model.safetensors")
    torch.save({}, tmp_path / "pipe/unet/diffusion_pytorch_model.bin")   # a pickle is never read
    with pytest.raises(NeonError, match="only safetensors"):
        family.load(str(tmp_path / "pipe"))
    (tmp_path / "pipe/model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(NeonError, match="not supported"):
        family.load(str(tmp_path / "pipe"))


def test_an_offline_hub_id_without_a_cached_copy_is_one_line(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NeonError, match="cannot get this Hub pipeline") as info:
        family.load("nobody-here/no-such-pipeline", local_files_only=True)
    assert "\n" not in str(info.value)
    res = subprocess.run([sys.executable, "-m", "neon", "sample", "--family", "diffusers", "--ckpt",
                          "nobody-here/no-such-pipeline", "--num-images", "1", "--out", str(tmp_path / "s.npz")],
                         env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "cannot get this Hub pipeline" in res.stderr.splitlines()[-1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith("s.npz")]   # refused before anything is written


# -- self-training ----------------------------------------------------------------------------------------------

class _Interrupt(Exception):
    pass


def test_interrupted_self_training_resumes_to_identical_weights(family, tmp_path):
    bundle = family.tiny(num_classes=2, seed=15)
    family.save(bundle, str(tmp_path / "base"))
    seeds = list(range(8))
    labels = np.array(seeds) % 2
    save_images_npz(str(tmp_path / "s.npz"), family.sample(bundle, seeds, torch.tensor(labels),
                                                           num_inference_steps=2).numpy(), labels, np.array(seeds))
    cfg = FinetuneConfig(lr=1e-3, batch=4, total_images=24, snapshot_every_images=8, ema={"beta": 0.5},
                         log_every_images=4)

    def run(out, stop_after=None):
        theta_r = family.load(str(tmp_path / "base"))
        examples = encode_examples(family, theta_r, str(tmp_path / "s.npz"), str(tmp_path / out / "cache"))
        calls = [0]
        loss = family.loss

        def counting_loss(b, batch, **kw):
            calls[0] += 1
            if stop_after is not None and calls[0] > stop_after:
                raise _Interrupt
            return loss(b, batch, **kw)
        family.loss = counting_loss
        try:
            return finetune(family, theta_r, examples, cfg, str(tmp_path / out))
        finally:
            del family.loss

    full = run("full")
    with pytest.raises(_Interrupt):
        run("cut", stop_after=3)   # killed after the first snapshot (2 steps), during the second
    cut = run("cut")
    assert [os.path.basename(p) for p in full] == [os.path.basename(p) for p in cut] and len(full) == 3
    assert all(os.path.isfile(os.path.join(p, "model_index.json")) for p in full)   # snapshots are pipelines
    a, b = load_state_dict(full[-1]), load_state_dict(cut[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_state_dict(str(tmp_path / "base"))
    assert any(not torch.equal(a[k], base[k]) for k in a)   # it did train


# -- a whole run on a pipeline folder ------------------------------------------------------------------------

def test_a_run_on_a_pipeline_folder_writes_pipeline_snapshots_and_a_merged_pipeline(family, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "configs", "diffusers_ddpm_cifar10.yaml")) as f:
        config = yaml.safe_load(f)
    base = tmp_path / "base"
    family.save(family.tiny(seed=16, **config["smoke"]["load_args"]), str(base))
    config["smoke"]["base"] = str(base)   # the smoke counts, on a real folder instead of the tiny network
    del config["smoke"]["load_args"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(tmp_path / "run.yaml"), "--smoke", "--out",
                          str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "run.json").read_text())
    snapshots = doc["stages"]["finetune"]["snapshots"]
    assert snapshots and all(os.path.isfile(os.path.join(p, "model_index.json")) for p in snapshots)
    w = doc["stages"]["sweep"]["best"]["w"]
    neon = diffusers.DiffusionPipeline.from_pretrained(str(out / "neon")).unet.state_dict()
    r, s = load_state_dict(str(base)), load_state_dict(doc["stages"]["sweep"]["theta_s"])   # the best snapshot
    assert all(torch.equal(v, merge_tensor(r[k], s[k], w)) for k, v in neon.items())
    card = (out / "MODEL_CARD.md").read_text()   # what the merged pipeline is, to share it as it is
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert str(base) in card and f"Chosen: w = {w:g}" in card and f"neon run {tmp_path / 'run.yaml'} --smoke" in card
    assert sum(line.startswith(f"| {p['w']:g} |") for p in points for line in card.splitlines()) == len(points)


# -- training from scratch: the Fashion-MNIST study through this family -------------------------------------

def test_build_gives_a_fresh_unet_of_the_asked_sizes_the_same_for_the_same_seed(family):
    sizes = dict(resolution=16, img_channels=1, num_classes=10, model_channels=8, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[8], dropout=0.0)
    a, b = family.build(seed=3, **sizes), family.build(seed=3, **sizes)
    assert (a.resolution, a.channels, a.num_classes) == (16, 1, 10)
    assert [blk.__class__.__name__ for blk in a.net.down_blocks] == ["DownBlock2D", "AttnDownBlock2D"]
    assert all(torch.equal(v, b.net.state_dict()[k]) for k, v in a.net.state_dict().items())
    assert family.sample(a, [0], torch.tensor([9]), num_inference_steps=2).shape == (1, 16, 16, 1)
    with pytest.raises(NeonError, match="unknown arguments"):
        family.build(resolution=16, channels=1)


def test_the_fashion_mnist_study_runs_through_the_family(tmp_path):
    from experiments.fashion_mnist import run_study
    from experiments.fashion_mnist.datasets import write_idx
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = yaml.safe_load(open(os.path.join(repo, "configs", "fashion_mnist_diffusers.yaml")))
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 100)):   # Fashion-MNIST-shaped idx files, a class-dependent square
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:10 + 2 * c, 4:12] = 220
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    data["study"]["data_root"] = str(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    doc = run_study(str(tmp_path / "study.yaml"), str(tmp_path / "run"), smoke=True)
    assert doc["smoke"] and set(doc["arms"]) == {"ode", "control", "diverse"}
    for arm, ws in data["smoke"]["study"]["sweep"].items():
        rows = doc["arms"][arm]["rows"]
        assert [r["w"] for r in rows] == sorted(set(ws) | {0.0})
        assert all(np.isfinite(r["classifier_fd"]) for r in rows)           # the grid, on the validation range
