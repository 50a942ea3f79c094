"""Statistics files (EDM fid-refs / ADM layout), image sets on disk, and the refusals, one line each."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from neon.cli import main as neon_main
from neon.errors import NeonError
from neon.images import open_images
from neon.metrics import load_stats, save_stats
from neon.metrics.testing import random_images, save_random_compat_weights


def random_gaussian(dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((dim + 5, dim))
    return x.mean(0), np.cov(x, rowvar=False)


def test_round_trip_is_exact_and_leaves_no_temp_files(tmp_path):
    mu, sigma = random_gaussian(16)
    feats = np.random.default_rng(1).standard_normal((21, 16)).astype(np.float32)
    save_stats(tmp_path / "ref.npz", mu, sigma, count=21, features=feats)
    stats = load_stats(tmp_path / "ref.npz", dim=16)
    assert stats.mu.dtype == stats.sigma.dtype == np.float64
    assert np.array_equal(stats.mu, mu) and np.array_equal(stats.sigma, sigma)
    assert stats.count == 21 and np.array_equal(stats.features, feats)
    assert os.listdir(tmp_path) == ["ref.npz"]


def test_reads_edm_and_adm_layouts(tmp_path):
    mu, sigma = random_gaussian(8)
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)                       # EDM fid-refs: mu, sigma only
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8),  # ADM: images + spatial stats too
             mu=mu.astype(np.float32), sigma=sigma, mu_s=mu, sigma_s=sigma)
    for name in ("edm.npz", "adm.npz"):
        stats = load_stats(tmp_path / name)
        assert stats.mu.dtype == np.float64 and stats.count is None and stats.features is None
        np.testing.assert_allclose(stats.mu, mu, rtol=1e-6)


def test_refusals_are_one_line_neon_errors(tmp_path):
    mu, sigma = random_gaussian(8)
    save_stats(tmp_path / "ok.npz", mu, sigma)
    np.savez(tmp_path / "nokeys.npz", m=mu)
    np.savez(tmp_path / "one.npz", mu=mu, sigma=sigma, count=1)
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:4])
    np.savez(tmp_path / "nan.npz", mu=mu * np.nan, sigma=sigma)
    (tmp_path / "text.npz").write_text("not a zip")
    cases = [
        (lambda: load_stats(tmp_path / "missing.npz"), "not found"),
        (lambda: load_stats(tmp_path / "nokeys.npz"), "expected arrays 'mu' and 'sigma'"),
        (lambda: load_stats(tmp_path / "ok.npz", dim=2048), "8-d but the detector gives 2048-d"),
        (lambda: load_stats(tmp_path / "one.npz"), "at least 2"),
        (lambda: load_stats(tmp_path / "shape.npz"), "expected mu"),
        (lambda: load_stats(tmp_path / "nan.npz"), "NaN"),
        (lambda: load_stats(tmp_path / "text.npz"), "not a readable"),
        (lambda: save_stats(tmp_path / "few.npz", mu, sigma, count=1), "at least 2"),
    ]
    for call, message in cases:
        with pytest.raises(NeonError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "few.npz").exists()


def test_image_sets_npz_compressed_and_folder_agree(tmp_path):
    images = random_images(5, 9, 7, seed=4).numpy()
    np.savez(tmp_path / "plain.npz", images, np.arange(5))          # ADM layout: arr_0 images, arr_1 labels
    np.savez_compressed(tmp_path / "packed.npz", images)
    (tmp_path / "pngs" / "sub").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "pngs" / ("sub" if i % 2 else "") / f"{i:03d}.png")
    plain, packed = open_images(tmp_path / "plain.npz"), open_images(tmp_path / "packed.npz")
    assert isinstance(plain.array, np.memmap)  # uncompressed: read lazily, never whole
    assert len(plain) == len(packed) == 5
    assert np.array_equal(plain.take([4, 0]), images[[4, 0]]) and np.array_equal(packed.take([1]), images[[1]])
    assert np.array_equal(plain.labels, np.arange(5))
    folder = open_images(tmp_path / "pngs")
    # Sorted by path, as EDM's and torch-fidelity's folder readers do: 000, 002, 004, sub/001, sub/003.
    assert len(folder) == 5 and np.array_equal(folder.take([0, 1, 2, 3, 4]), images[[0, 2, 4, 1, 3]])


def test_cli_stats_then_fid_writes_json_and_refuses_dimension_mismatch(tmp_path, capsys):
    weights = save_random_compat_weights(tmp_path / "w.pth", seed=1)
    np.savez(tmp_path / "real.npz", random_images(3, 16, 16, seed=5).numpy())
    np.savez(tmp_path / "fake.npz", random_images(3, 12, 12, seed=6).numpy())
    common = ["--inception-weights", str(weights), "--batch", "2", "--quiet"]
    neon_main(["stats", "--images", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"), *common])
    assert load_stats(tmp_path / "ref.npz", dim=2048).count == 3
    neon_main(["fid", "--images", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "ref.npz"),
               "--json", str(tmp_path / "out.json"), "--is", *common])
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["num_images"] == 3 and result["fid"] > 0
    assert result["is_mean"] is None and result["is_unavailable"] == "3 images < 10 splits"  # said, not invented
    assert "FID" in capsys.readouterr().out

    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    for argv, message in [
        (["fid", "--images", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "small.npz")], "64-d"),
        (["fid", "--images", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "none.npz")], "not found"),
        (["stats", "--images", str(tmp_path / "fake.npz"), "--out", str(tmp_path / "x.npz"), "--num-images", "1"],
         "at least 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            neon_main(argv + common)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
