"""The paper rows' configs against the official runs' arithmetic: the EDM rows' snapshots are those the Neon
repository's copy of NVlabs/edm's training loop writes, and their sweep skips the tick-0 one as
edm/cal_metrics_all.py does."""
import os

import pytest

from neon.config import FinetuneConfig, load_config, snapshot_images

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def official_snapshots(batch: int, total_images: int, tick_images: int, snapshot_ticks: int) -> list[int]:
    """cur_nimg at each network-snapshot the Neon repository's edm/training/training_loop.py writes, replayed
    step by step (total_kimg * 1000 and kimg_per_tick * 1000 there): its tick test has no `cur_tick != 0` guard,
    so tick 0 ends after the first tick's images."""
    cur_nimg, tick_start_nimg, cur_tick, written = 0, 0, 0, []
    while True:
        cur_nimg += batch
        done = cur_nimg >= total_images
        if (not done) and (cur_nimg < tick_start_nimg + tick_images):
            continue
        if done or cur_tick % snapshot_ticks == 0:
            written.append(cur_nimg)
        cur_tick += 1
        tick_start_nimg = cur_nimg
        if done:
            return written


@pytest.mark.parametrize("batch, total, tick, snap", [(512, 6_000_000, 50_000, 10), (256, 3_000_000, 50_000, 5),
                                                      (8, 32, 8, 2), (48, 1000, 100, 3), (7, 50, 13, 1)])
def test_tick_snapshots_replay_the_official_loop(batch, total, tick, snap):
    ft = FinetuneConfig(batch=batch, total_images=total, tick_images=tick, snapshot_ticks=snap)
    assert snapshot_images(ft) == official_snapshots(batch, total, tick, snap)


@pytest.mark.parametrize("row, batch, total_kimg, snap", [("edm_cifar10_cond", 512, 6000, 10),
                                                          ("edm_cifar10_uncond", 512, 6000, 10),
                                                          ("edm_ffhq64", 256, 3000, 5)])
def test_edm_rows_write_and_sweep_the_official_snapshots(row, batch, total_kimg, snap):
    """edm/run_cifar10.sh and run_ffhq.sh: --tick=50 --snap=N; cal_metrics_all.py skips network-snapshot-000050."""
    cfg = load_config(os.path.join(CONFIGS, f"{row}.yaml"))
    written = official_snapshots(batch, total_kimg * 1000, 50 * 1000, snap)
    assert snapshot_images(cfg.finetune) == written
    assert cfg.sweep.snapshot == [n for n in written if f"{n // 1000:06d}" != "000050"]


def imm_official_snapshots(batch: int, total_ticks: int, tick_images: int, snapshot_ticks: int) -> list[int]:
    """Images seen at each network-snapshot of the Neon repository's imm/training/training_loop.py: cur_tick starts
    at 1 (line 353), a tick ends after tick_images (line 406), and the loop is done at the first step of tick
    total_ticks (line 402)."""
    cur_nimg, tick_start_nimg, cur_tick, written = 0, 0, 1, []
    for _ in range(total_ticks * tick_images // batch):
        cur_nimg += batch
        done = cur_tick >= total_ticks
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + tick_images):
            continue
        if (done or cur_tick % snapshot_ticks == 0) and cur_tick != 0:
            written.append(cur_nimg)
        cur_tick += 1
        tick_start_nimg = cur_nimg
        if done:
            break
    return written


def var_official_snapshots(batch: int, total_images: int, save_interval: int) -> list[int]:
    """Images seen at each ar-ckpt-images_N.pth of the Neon repository's VAR train.py (train_one_ep): the stop is
    checked before the save, with images_seen counted before the step, and nothing is saved at the stop."""
    g_it, next_save, written = 0, 0, []
    while g_it * batch < total_images:
        if g_it * batch >= next_save:
            written.append(g_it * batch)
            next_save += save_interval
        g_it += 1
    return written


def test_imm_row_writes_the_official_snapshots_to_the_last_one():
    """im256.yaml: total_ticks 60, kimg_per_tick 102.4, snapshot_ticks 1, batch 512; the last holds 6,042,112."""
    cfg = load_config(os.path.join(CONFIGS, "imm_in256.yaml"))
    written = imm_official_snapshots(512, 60, 102_400, 1)
    assert snapshot_images(cfg.finetune) == written and written[-1] == 6_042_112 and len(written) == 60
    assert cfg.sweep.snapshot == "all"


@pytest.mark.parametrize("row, batch, total, interval", [("var_d16_256", 768, 7_500_000, 250_000),
                                                         ("var_d36_512", 24, 3_001_000, 200_000)])
def test_var_rows_sweep_the_official_snapshots_and_train_as_long(row, batch, total, interval):
    """run_var_imagenet_*.sh: --bs, --total_images (7.5M for the d16 row: see its config), --save_interval;
    EPOCHS lists every file but ar-ckpt-images_0 (θr). Training stops where [T] stops: its first step past
    total_images, whose weights self-training saves as its last snapshot (not swept)."""
    cfg = load_config(os.path.join(CONFIGS, f"{row}.yaml"))
    written = [n for n in var_official_snapshots(batch, total, interval) if n > 0]
    assert cfg.finetune.total_images == total and cfg.finetune.warmup_images == total
    assert snapshot_images(cfg.finetune) == written + [-(-total // batch) * batch]
    assert cfg.sweep.snapshot == written


def test_the_neon_edm_covariance_is_the_official_second_moment_formula():
    """edm/cal_metrics_all.py:115: sigma = sum of x xᵀ / (total_count - 1) - torch.ger(mu, mu)."""
    import numpy as np
    import torch

    from neon.metrics.frechet import gaussian_from_features
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 3.0
    mu, sigma = gaussian_from_features(x, "neon_edm")
    official = (x.T @ x / (x.shape[0] - 1) - torch.outer(x.mean(0), x.mean(0))).numpy()
    np.testing.assert_allclose(sigma, official, rtol=1e-12, atol=1e-12)
    _, unbiased = gaussian_from_features(x)
    np.testing.assert_allclose(unbiased, np.cov(x.numpy(), rowvar=False), rtol=1e-12, atol=1e-12)


def test_a_result_made_with_the_neon_edm_covariance_says_so(tmp_path):
    import numpy as np

    from neon.evaluate import FIDMetric
    from neon.metrics import save_stats
    from neon.sweep import metrics_label
    ref = tmp_path / "ref.npz"
    save_stats(str(ref), np.zeros(2048), np.eye(2048), count=10)
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    results = {}
    for covariance in ("unbiased", "neon_edm"):
        acc = FIDMetric("inception-v3-compat", str(ref), "cpu", "fid-helper", covariance=covariance)()
        acc.update(__import__("torch").from_numpy(images), list(range(6)))
        results[covariance] = acc.finish()
    assert "covariance" not in results["unbiased"] and results["neon_edm"]["covariance"] == "neon_edm"
    assert results["neon_edm"]["fid"] > results["unbiased"]["fid"]   # μμᵀ/(n−1) is positive semi-definite
    assert metrics_label(results["neon_edm"]).endswith("(covariance neon_edm)")


def test_an_unknown_covariance_is_refused_in_one_line():
    from neon.config import ConfigError, parse_config
    with pytest.raises(ConfigError, match=r"^metrics.covariance: 'biased' is not one of unbiased, neon_edm$"):
        parse_config({"family": "tinypix", "metrics": {"covariance": "biased"}, "synthetic": {"num_images": 4}},
                     smoke=True)


def test_xar_rounds_to_uint8_as_its_own_evaluator_and_truncates_as_neons_scripts():
    import numpy as np
    import torch

    from xar.adapter import images_to_uint8
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    for dtype in (torch.float32, torch.float16):
        decoded = x.to(dtype)
        half = ((decoded + 1) / 2).numpy()      # engine_xar.py:140-148, in the decoder's dtype
        official = np.round(np.clip(half.transpose(0, 2, 3, 1) * 255, 0, 255)).astype(np.uint8)
        assert np.array_equal(images_to_uint8(decoded, "round").numpy(), official)
    truncated = ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(images_to_uint8(x), truncated)


@pytest.mark.parametrize("row", ["xar_b_256", "xar_l_256"])
def test_xar_rows_evaluate_theta_r_with_its_own_repositorys_conversion(row):
    cfg = load_config(os.path.join(CONFIGS, f"{row}.yaml"))
    assert cfg.final.base_sampler["to_uint8"] == "round"
    assert "to_uint8" not in cfg.final.sampler and "to_uint8" not in cfg.sweep.sampler   # Neon's: truncate


@pytest.mark.parametrize("name, stage, expected", [
    ("edm", "sample", (False, True, False)), ("edm", "train", (False, False, True)),
    ("imm", "sample", (True, True, True)), ("imm", "train", (False, False, True)),
    ("var", "sample", (False, True, False)), ("var", "train", (True, True, True)),
    ("xar", "sample", (False, True, False)), ("xar", "train", (True, True, True))])
def test_each_family_samples_and_trains_under_its_official_backend_settings(name, stage, expected):
    """(matmul TF32, cuDNN TF32, cuDNN benchmark) inside the stage, as the official scripts set them (the
    families' BACKENDS comments cite the lines); the settings before the stage come back after it."""
    import torch

    from neon import fastpaths
    from neon.family import get_family
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with fastpaths.backends(get_family(name).BACKENDS[stage]):
        inside = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.backends.cudnn.benchmark)
    assert inside == expected
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before


def test_sampling_and_training_run_inside_the_familys_backends(monkeypatch, tmp_path):
    """neon.sampling.draw_batch and neon.selftrain.finetune enter Family.BACKENDS' 'sample' and 'train'; TF32 a
    user asks for (neon sample --tf32) stays on while sampling."""
    import torch

    from neon import fastpaths
    from neon.config import FinetuneConfig
    from neon.sampling import draw_batch
    from neon.selftrain import finetune
    from neon.testing import TinyPixFamily
    seen = []

    class Recording(TinyPixFamily):
        BACKENDS = {"sample": fastpaths.Backends(matmul_tf32=False, cudnn_tf32=False, cudnn_benchmark=True),
                    "train": fastpaths.Backends(matmul_tf32=True, cudnn_tf32=False, cudnn_benchmark=False)}

        def sample(self, *args, **kwargs):
            seen.append(("sample", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         torch.backends.cudnn.benchmark))
            return super().sample(*args, **kwargs)

        def loss(self, *args, **kwargs):
            seen.append(("train", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         torch.backends.cudnn.benchmark))
            return super().loss(*args, **kwargs)

    family = Recording()
    bundle = family.tiny(seed=0)
    draw_batch(family, bundle, [0, 1], None, {"num_steps": 1})
    with fastpaths.tf32(True):
        draw_batch(family, bundle, [0, 1], None, {"num_steps": 1})
    assert seen == [("sample", False, False, True), ("sample", True, True, True)]   # --tf32 keeps TF32 on
    images = family.sample(bundle, [0, 1, 2, 3], None, num_steps=1)
    seen.clear()
    finetune(family, bundle, family.encode(bundle, images), FinetuneConfig(batch=2, total_images=2),
             str(tmp_path / "ft"))
    assert seen[0] == ("train", True, False, False)
