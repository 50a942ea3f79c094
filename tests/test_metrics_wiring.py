"""Precision/recall (PRDC) and KID wired into the sweep's and the final evaluation's metric (FIDMetric): the numbers
it records equal the `prdc` package's and neon.metrics' on the same features, on 1 or 2 processes; the config and
the real-features file are checked before anything is sampled.

Also a torchrun worker: `python -m torch.distributed.run ... tests/test_metrics_wiring.py DIR` scores DIR's images
with the accumulator, each rank its whole batches, and rank 0 writes DIR/two.json.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neon import dist
from neon.config import ConfigError, MetricsConfig, parse_config
from neon.errors import NeonError
from neon.evaluate import SMOKE_REAL_FEATURES, FIDMetric
from neon.metrics import FeatureExtractor, kid, prdc, save_stats
from neon.metrics.testing import random_images, save_random_compat_weights
from neon.sampling import deal, plan_batches

BATCH = 3


def make_inputs(folder: Path, n_real: int = 12, n_fake: int = 11):
    """Random detector weights, real features saved as `neon stats --features` does, and fake images; returns
    (weights, real features (N, D), fake images uint8 (M, H, W, 3))."""
    weights = save_random_compat_weights(folder / "w.pth", seed=3)
    extractor = FeatureExtractor("inception-v3-compat", str(weights), "cpu", logits=False)
    real = extractor(random_images(n_real, 16, 16, seed=30))["pool"].double()
    save_stats(folder / "real.npz", real.mean(0), torch.cov(real.T), count=n_real, features=real.float())
    fake_images = random_images(n_fake, 16, 16, seed=31)
    np.save(folder / "fake.npy", fake_images.numpy())
    return weights, real.float(), fake_images


def wired_metric(folder: Path, weights, **kwargs) -> FIDMetric:
    return FIDMetric("inception-v3-compat", str(folder / "real.npz"), "cpu", str(weights),
                     real_features=str(folder / "real.npz"), **kwargs)


def score_my_share(metric: FIDMetric, images: torch.Tensor) -> dict:
    """What evaluate_images does with a metric: whole batches per rank, each image's position as its index."""
    acc = metric()
    for part in deal(plan_batches(len(images), BATCH)):
        acc.update(images[list(part)], list(part))
    return acc.finish()


def test_wired_prdc_equals_the_prdc_package_and_neon_metrics(tmp_path):
    from prdc import compute_prdc
    weights, real, fake_images = make_inputs(tmp_path)
    metric = wired_metric(tmp_path, weights, precision_recall=True, kid=True, kid_subsets=4)
    out = score_my_share(metric, fake_images)
    fake = metric.extractor(fake_images)["pool"]
    reference = compute_prdc(real.double().numpy(), fake.double().numpy(), nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert out[key] == pytest.approx(float(reference[key]), abs=1e-12), key
    assert {k: out[k] for k in reference} == pytest.approx(prdc(real, fake, k=5), abs=1e-12)
    assert (out["kid_mean"], out["kid_std"]) == pytest.approx(
        (lambda r: (r["kid_mean"], r["kid_std"]))(kid(real, fake, subsets=4)), rel=1e-9)
    assert out["kid_subset_size"] == min(len(real), len(fake))   # fewer images than torch-fidelity's 1000
    assert 0 < out["recall"] < 1 or 0 < out["precision"] < 1     # not a degenerate all-or-nothing pair


def test_without_precision_recall_or_kid_nothing_extra_is_recorded_or_kept(tmp_path):
    weights, _, fake_images = make_inputs(tmp_path, n_fake=4)
    metric = FIDMetric("inception-v3-compat", str(tmp_path / "real.npz"), "cpu", str(weights))
    assert not metric.keep_features and metric().acc.keep_features is False
    out = score_my_share(metric, fake_images)
    assert not {"precision", "recall", "density", "coverage", "kid_mean", "kid_std"} & set(out)


def test_two_gloo_processes_record_what_one_records(tmp_path):
    weights, _, fake_images = make_inputs(tmp_path)
    # Subsets smaller than the set: KID then depends on the features being back in image order after the gather.
    one = score_my_share(wired_metric(tmp_path, weights, precision_recall=True, kid=True, kid_subsets=4,
                                      kid_subset_size=5), fake_images)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["num_images"] == one["num_images"] == len(fake_images)
    for key in ("precision", "recall", "density", "coverage", "kid_mean", "kid_std", "kid_subset_size"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)


def test_a_real_features_file_without_features_is_refused_before_sampling(tmp_path):
    weights, real, _ = make_inputs(tmp_path, n_fake=1)
    save_stats(tmp_path / "no_features.npz", real.double().mean(0), torch.cov(real.double().T), count=len(real))
    with pytest.raises(NeonError, match=r"no_features.npz: holds no 'features'"):
        FIDMetric("inception-v3-compat", str(tmp_path / "real.npz"), "cpu", str(weights),
                  real_features=str(tmp_path / "no_features.npz"), kid=True)
    with pytest.raises(NeonError, match="metrics.real_features"):
        FIDMetric("inception-v3-compat", str(tmp_path / "real.npz"), "cpu", str(weights), precision_recall=True)
    with pytest.raises(NeonError, match="not found"):
        FIDMetric("inception-v3-compat", str(tmp_path / "real.npz"), "cpu", str(weights),
                  real_features=str(tmp_path / "missing.npz"), precision_recall=True)


def test_too_few_real_features_for_k_are_refused(tmp_path):
    weights, real, _ = make_inputs(tmp_path, n_real=5, n_fake=1)
    with pytest.raises(NeonError, match="real.npz: 'features' holds 5 rows, at least 6"):
        wired_metric(tmp_path, weights, precision_recall=True)


def config(metrics: dict) -> dict:
    return {"family": "x", "synthetic": {"num_images": 2}, "metrics": metrics}


@pytest.mark.parametrize("asked", [{"precision_recall": True}, {"kid": True}])
def test_config_refuses_precision_recall_or_kid_without_real_features(asked):
    with pytest.raises(ConfigError, match=r"^metrics.real_features: .*need the real images' features"):
        parse_config(config(asked))
    parse_config(config(asked), smoke=True)  # a smoke run lets features of S stand in
    parse_config(config({**asked, "real_features": "real.npz"}))


@pytest.mark.parametrize("field, value", [("kid_subsets", 0), ("kid_subset_size", 1)])
def test_config_refuses_empty_kid_subsets(field, value):
    with pytest.raises(ConfigError, match=f"^metrics.{field}: must be at least"):
        parse_config(config({field: value}))


def test_smoke_stand_in_features_are_those_of_the_given_images(tmp_path):
    weights, _, fake_images = make_inputs(tmp_path, n_fake=8)
    np.savez(tmp_path / "synthetic.npz", fake_images.numpy())
    m = MetricsConfig(weights=str(weights), inception_score=False, precision_recall=True, kid=True, kid_subsets=2)
    metric = FIDMetric.from_config(m, str(tmp_path / "real.npz"), "cpu", stand_in=str(tmp_path / "synthetic.npz"),
                                   out=str(tmp_path), batch=BATCH)
    assert (tmp_path / SMOKE_REAL_FEATURES).is_file()
    torch.testing.assert_close(metric.real, metric.extractor(fake_images)["pool"])
    out = score_my_share(metric, fake_images)   # S against itself: every fake inside the real balls
    assert (out["precision"], out["recall"], out["coverage"]) == (1.0, 1.0, 1.0)


def test_from_config_without_real_features_or_stand_in_is_refused(tmp_path):
    weights, _, _ = make_inputs(tmp_path, n_fake=1)
    m = MetricsConfig(weights=str(weights), precision_recall=True)
    with pytest.raises(NeonError, match="metrics.real_features"):
        FIDMetric.from_config(m, str(tmp_path / "real.npz"), "cpu")


def test_neon_evaluate_and_neon_fid_record_the_same_prdc_and_kid(tmp_path):
    from neon.cli import main as neon_main
    from neon.testing import TinyPixFamily
    weights, _, _ = make_inputs(tmp_path, n_fake=1)
    family = TinyPixFamily()
    family.save(family.tiny(), str(tmp_path / "tiny.pth"))
    real = str(tmp_path / "real.npz")
    scores = ["--prdc", "--kid", "--kid-subsets", "3", "--real", real]
    evaluate = ["evaluate", "--family", "tinypix", "--ckpt", str(tmp_path / "tiny.pth"), "--ref", real,
                "--num-images", "8", "--batch", "4", "--inception-weights", str(weights), "--no-is", *scores]
    neon_main([*evaluate, "--json", str(tmp_path / "streamed.json")])                   # the accumulator
    neon_main([*evaluate, "--save-images", str(tmp_path / "s.npz"), "--json", str(tmp_path / "saved.json")])
    neon_main(["fid", "--images", str(tmp_path / "s.npz"), "--ref", real, "--inception-weights", str(weights),
               "--quiet", *scores, "--json", str(tmp_path / "fid.json")])
    streamed, saved, fid = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("streamed", "saved", "fid"))
    keys = ("precision", "recall", "density", "coverage", "kid_mean", "kid_std", "kid_subset_size")
    assert all(k in streamed for k in keys)
    for key in keys:
        assert streamed[key] == pytest.approx(saved[key], abs=1e-6) and saved[key] == pytest.approx(fid[key], abs=1e-9)


@pytest.mark.parametrize("command", ["evaluate", "fid"])
def test_kid_without_real_features_is_refused_in_one_line(tmp_path, capsys, command):
    from neon.cli import main as neon_main
    (tmp_path / "f").write_bytes(b"")
    args = (["evaluate", "--family", "tinypix", "--ckpt", str(tmp_path / "f")] if command == "evaluate"
            else ["fid", "--images", str(tmp_path / "f")])
    weights = save_random_compat_weights(tmp_path / "w.pth")
    save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), count=2)
    with pytest.raises(SystemExit):
        neon_main([*args, "--ref", str(tmp_path / "ref.npz"), "--inception-weights", str(weights), "--kid"])
    err = capsys.readouterr().err.strip()
    assert "--kid needs --real" in err
    assert len(err.splitlines()) == 1


def _worker(folder: str) -> None:
    folder = Path(folder)
    dist.init("gloo")
    metric = wired_metric(folder, folder / "w.pth", precision_recall=True, kid=True, kid_subsets=4, kid_subset_size=5)
    out = score_my_share(metric, torch.from_numpy(np.load(folder / "fake.npy")))
    if dist.is_main():
        (folder / "two.json").write_text(json.dumps({**out, "world_size": dist.world_size()}))
    dist.barrier()


if __name__ == "__main__":
    _worker(sys.argv[1])
