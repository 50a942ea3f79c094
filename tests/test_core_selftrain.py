"""Self-training: resumable to the bit, EMA and lr ramp as specified, NaN stops with a clear error."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from neon.checkpoint import load_state_dict
from neon.config import FinetuneConfig
from neon.errors import NeonError
from neon.family import get_family, register
from neon.images import save_images_npz
from neon.sampling import class_labels, sample_to_npz
from neon.selftrain import ema_beta, encode_examples, example_indices, finetune, update_scale
from neon.testing import TinyPixFamily

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syn")
    family = get_family("tinypix")
    bundle = family.tiny(num_classes=3, seed=1)
    family.save(bundle, str(folder / "base.pth"))
    seeds = list(range(96))
    sample_to_npz(family, bundle, seeds, class_labels(seeds, 3, "per_class"), str(folder / "s.npz"), batch=32)
    return folder


def _finetune_cmd(folder, out, *extra):
    return [sys.executable, "-m", "neon", "finetune", "--family", "tinypix", "--ckpt", str(folder / "base.pth"),
            "--data", str(folder / "s.npz"), "--out", str(out), "--lr", "1e-3", "--batch", "8",
            "--ema-halflife-images", "64", "--warmup-images", "40", *extra]


def test_example_stream_covers_every_example_once_per_epoch():
    idx = torch.cat([example_indices(s, 6, 10, seed=3) for s in range(5)])  # 30 = three epochs of 10
    for epoch in range(3):
        assert sorted(idx[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert torch.equal(example_indices(2, 6, 10, 3), idx[12:18])


def test_ema_half_life_and_rate():
    assert ema_beta({"halflife_images": 500_000}, 512) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta({"beta": 0.9999}, 64) == 0.9999
    assert ema_beta(None, 64) is None


def test_killed_finetune_resumes_to_identical_weights(tmp_path, synthetic):
    args = ["--total-images", "4000", "--snapshot-every-images", "400"]
    subprocess.run(_finetune_cmd(synthetic, tmp_path / "full", *args), env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen(_finetune_cmd(synthetic, tmp_path / "killed", *args), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "train_state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not state.exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "finetune.json").exists(), "training finished before it was killed"
    out = subprocess.run(_finetune_cmd(synthetic, tmp_path / "killed", *args), env=ENV, check=True,
                         capture_output=True, text=True)
    assert "resuming self-training" in out.stdout
    full = sorted((tmp_path / "full").glob("snapshot-*.pth"))
    killed = sorted((tmp_path / "killed").glob("snapshot-*.pth"))
    assert [p.name for p in full] == [p.name for p in killed] and len(full) == 10
    a, b = load_state_dict(str(full[-1])), load_state_dict(str(killed[-1]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_state_dict(str(synthetic / "base.pth"))
    assert not torch.equal(a["conv_in.weight"], base["conv_in.weight"])  # it did train
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["images"] == 4000 and np.isfinite(log[-1]["loss"])


def test_ema_starts_from_theta_r_and_lr_ramps(tmp_path, synthetic):
    family = get_family("tinypix")
    bundle = family.load(str(synthetic / "base.pth"))
    theta_r = {k: v.clone() for k, v in bundle.net.state_dict().items()}
    examples = encode_examples(family, bundle, str(synthetic / "s.npz"), str(tmp_path / "cache"))
    cfg = FinetuneConfig(lr=1e-3, batch=8, total_images=16, warmup_images=32, ema={"beta": 0.75})
    snaps = finetune(family, bundle, examples, cfg, str(tmp_path / "ft"))
    assert all(torch.equal(v, theta_r[k]) for k, v in bundle.net.state_dict().items()), "θr is left alone"
    theta = torch.load(tmp_path / "ft" / "train_state.pt", weights_only=True)["net"]   # the trained network
    ema = load_state_dict(snaps[-1])
    # two steps: ema = 0.75²·θr + 0.25·0.75·θ1 + 0.25·θ2; at least it lies strictly between θr and θ
    k = "conv_out.weight"
    assert not torch.equal(ema[k], theta_r[k]) and not torch.equal(ema[k], theta[k])
    assert (ema[k] - theta_r[k]).norm() < (theta[k] - theta_r[k]).norm()
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == pytest.approx(1e-3 * 16 / 32)
    cached = encode_examples(family, bundle, str(synthetic / "s.npz"), str(tmp_path / "cache"))   # read back
    assert cached["x"].shape == (96, 3, 8, 8) and cached["label"][:4].tolist() == [0, 1, 2, 0]


def test_cached_examples_are_memory_maps_equal_to_the_encoded_set_and_are_read_back(tmp_path, synthetic, monkeypatch):
    family = get_family("tinypix")
    bundle = family.load(str(synthetic / "base.pth"))
    in_memory = encode_examples(family, bundle, str(synthetic / "s.npz"), batch=10)
    cached = encode_examples(family, bundle, str(synthetic / "s.npz"), str(tmp_path / "cache"), batch=10)
    assert sorted(cached) == sorted(in_memory) and all(torch.equal(cached[k], in_memory[k]) for k in in_memory)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["index.json", "label.bin", "x.bin"]
    monkeypatch.setattr(type(family), "encode", lambda *a: pytest.fail("a complete cache is encoded again"))
    again = encode_examples(family, bundle, str(synthetic / "s.npz"), str(tmp_path / "cache"), batch=10)
    assert all(torch.equal(again[k], in_memory[k]) for k in in_memory)


def test_an_unfinished_or_foreign_cache_is_encoded_again(tmp_path, synthetic):
    family = get_family("tinypix")
    bundle = family.load(str(synthetic / "base.pth"))
    cache = tmp_path / "cache"
    expected = {k: v.clone() for k, v in encode_examples(family, bundle, str(synthetic / "s.npz"), str(cache)).items()}
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps({**index, "complete": False}))   # killed while encoding
    (cache / "x.bin").write_bytes(b"\0" * (cache / "x.bin").stat().st_size)
    assert torch.equal(encode_examples(family, bundle, str(synthetic / "s.npz"), str(cache))["x"], expected["x"])
    other = tmp_path / "other.npz"
    save_images_npz(str(other), np.zeros((5, 8, 8, 3), np.uint8), np.zeros(5, np.int64))
    assert encode_examples(family, bundle, str(other), str(cache))["x"].shape[0] == 5


class _NaNFamily(TinyPixFamily):
    name = "nanpix"

    def loss(self, bundle, batch):
        return super().loss(bundle, batch) * float("nan")


def test_nan_loss_stops_with_a_clear_error(tmp_path, synthetic):
    register("nanpix", _NaNFamily)
    family = get_family("nanpix")
    bundle = family.load(str(synthetic / "base.pth"))
    examples = encode_examples(family, bundle, str(synthetic / "s.npz"))
    with pytest.raises(NeonError, match="loss became nan at step 0"):
        finetune(family, bundle, examples, FinetuneConfig(lr=1e-3, batch=8, total_images=64), str(tmp_path / "ft"))
    assert not list((tmp_path / "ft").glob("snapshot-*"))


def test_image_folder_with_labels_is_training_data(tmp_path, synthetic):
    from neon.images import NpzImages, export_png
    export_png(NpzImages(str(synthetic / "s.npz")), str(tmp_path / "png"))
    family = get_family("tinypix")
    bundle = family.load(str(synthetic / "base.pth"))
    from_folder = encode_examples(family, bundle, str(tmp_path / "png"))
    from_npz = encode_examples(family, bundle, str(synthetic / "s.npz"))
    assert all(torch.equal(from_folder[k], from_npz[k]) for k in from_npz)
    save_images_npz(str(tmp_path / "nolabels.npz"), np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(NeonError, match="no labels"):
        encode_examples(family, bundle, str(tmp_path / "nolabels.npz"))


def test_decay_1d_false_exempts_biases_from_weight_decay():
    from neon.family import TrainDefaults
    from neon.selftrain import make_optimizer
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(net.named_parameters(), 1e-3, TrainDefaults(weight_decay=0.02, decay_1d=False))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
    opt = make_optimizer(net.named_parameters(), 1e-3, TrainDefaults(weight_decay=0.02))
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4


def _deterministic_finetune(tmp_path, synthetic, out: str, *extra: str, lr: str = "1e-3",
                            launcher: tuple[str, ...] = ()) -> dict:
    """`neon finetune` of the family whose loss draws nothing at random, batch 8 for 64 images, into
    tmp_path/out (`launcher`: e.g. torch.distributed.run's arguments) -> its snapshot's state dict."""
    env = {**ENV, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + ENV.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, *(launcher or ("-m",)), "neon", "finetune", "--family",
                    "deterministic_family:DeterministicPix", "--ckpt", str(synthetic / "base.pth"), "--data",
                    str(synthetic / "s.npz"), "--lr", lr, "--batch", "8", "--total-images", "64", "--ema-beta",
                    "0.5", *extra, "--out", str(tmp_path / out)], env=env, check=True, capture_output=True)
    return load_state_dict(str(next((tmp_path / out).glob("snapshot-*.pth"))))


def _assert_trained_alike(a: dict, b: dict, synthetic) -> None:
    """b equals a to float rounding, and a moved away from θr (it trained)."""
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    base = load_state_dict(str(synthetic / "base.pth"))
    assert (a["conv_out.weight"] - base["conv_out.weight"]).abs().max() > 1e-3


def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, synthetic):
    """Gradients are averaged over ranks: with a loss that draws nothing at random, 2 gloo processes on a global
    batch of 8 (4 each) reach the weights one process reaches on batches of 8 (to float rounding)."""
    one = _deterministic_finetune(tmp_path, synthetic, "one")
    two = _deterministic_finetune(tmp_path, synthetic, "two", launcher=(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"))
    _assert_trained_alike(one, two, synthetic)


@pytest.mark.parametrize("accumulate", [2, 3])   # 3 micro-batches of a share of 8: 3, 3, 2 images
def test_micro_batches_train_like_the_whole_batch(tmp_path, synthetic, accumulate):
    """Gradient accumulation: with a loss that draws nothing at random, the batch of 8 in micro-batches reaches
    the weights the one-pass step reaches (to float rounding), and the logged losses agree."""
    steep = ("--opt", "eps=10")   # Adam's eps ≫ √v: steps ∝ the gradient, so a mis-weighted micro-batch shows
    whole = _deterministic_finetune(tmp_path, synthetic, "whole", *steep, lr="0.1")
    micro = _deterministic_finetune(tmp_path, synthetic, "micro", *steep, "--accumulate", str(accumulate), lr="0.1")
    _assert_trained_alike(whole, micro, synthetic)
    logs = [[json.loads(x)["loss"] for x in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("whole", "micro")]
    assert logs[1] == pytest.approx(logs[0], rel=1e-4)


def test_more_micro_batches_than_images_per_process_are_refused():
    from neon.config import FinetuneConfig
    from neon.selftrain import check_finetune_config
    with pytest.raises(NeonError, match="finetune.accumulate"):
        check_finetune_config(FinetuneConfig(batch=4, accumulate=5))
    check_finetune_config(FinetuneConfig(batch=4, accumulate=4))


def _scales_after_steps(max_scale, steps: int = 4) -> list[float]:
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14, growth_interval=1)   # grows after every good step
    scales = []
    for _ in range(steps):
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        update_scale(scaler, max_scale)
        scales.append(scaler.get_scale())
    return scales


def test_grad_scale_above_the_cap_when_stepping_is_set_back_to_it():
    """VAR's AmpOptimizer: after scaler.step, a scale above 2**15 is reset to 2**15, else update() as usual."""
    assert _scales_after_steps(2.0 ** 15) == [2.0 ** 15, 2.0 ** 16, 2.0 ** 15, 2.0 ** 16]
    assert _scales_after_steps(None) == [2.0 ** 15, 2.0 ** 16, 2.0 ** 17, 2.0 ** 18]


@pytest.mark.parametrize("ticks", [{"snapshot_every_images": 12}, {"tick_images": 10, "snapshot_ticks": 2}])
def test_self_training_writes_its_snapshots_where_the_config_lists_them(tmp_path, synthetic, ticks):
    """Every N images, or NVlabs/edm's ticks (here ticks of 2 steps of 8: 16, 48, and the last step, 56)."""
    from neon.config import snapshot_images
    from neon.snapshot_sweep import images_seen
    family = get_family("tinypix")
    bundle = family.load(str(synthetic / "base.pth"))
    examples = encode_examples(family, bundle, str(synthetic / "s.npz"), str(tmp_path / "cache"))
    cfg = FinetuneConfig(lr=1e-3, batch=8, total_images=56, **ticks)
    snaps = finetune(family, bundle, examples, cfg, str(tmp_path / "ft"))
    assert [images_seen(p) for p in snaps] == snapshot_images(cfg)
    assert snapshot_images(cfg) == ([16, 24, 40, 48, 56] if "snapshot_every_images" in ticks else [16, 48, 56])
