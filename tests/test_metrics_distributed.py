"""`neon fid` under torchrun with 2 gloo processes gives what one process gives (IS order, PRDC and KID included)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from neon.cli import main as neon_main
from neon.metrics.testing import random_images, save_random_compat_weights


def test_two_gloo_processes_equal_one(tmp_path):
    weights = save_random_compat_weights(tmp_path / "w.pth", seed=2)
    np.savez(tmp_path / "real.npz", random_images(7, 16, 16, seed=20).numpy())
    np.savez(tmp_path / "fake.npz", random_images(11, 16, 16, seed=21).numpy())  # odd: ranks get 6 and 5
    common = ["--inception-weights", str(weights), "--batch", "3", "--quiet"]
    neon_main(["stats", "--images", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"), "--features",
               *common])
    fid_args = ["fid", "--images", str(tmp_path / "fake.npz"), "--ref", str(tmp_path / "ref.npz"), "--is",
                "--splits", "5", "--prdc", "--kid", "--kid-subsets", "4", "--real", str(tmp_path / "ref.npz"),
                "--k", "3", *common]

    neon_main([*fid_args, "--json", str(tmp_path / "one.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "neon", *fid_args, "--json", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["num_images"] == two["num_images"] == 11
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    # IS shuffles and splits by position: equal only if the gathered features are back in image order.
    assert two["is_mean"] == pytest.approx(one["is_mean"], rel=1e-6)
    assert two["is_std"] == pytest.approx(one["is_std"], rel=1e-4)
    for key in ("precision", "recall", "density", "coverage"):
        assert two[key] == one[key]
    assert two["kid_subset_size"] == one["kid_subset_size"] == 7   # the smaller (real) set, whole
    assert (two["kid_mean"], two["kid_std"]) == pytest.approx((one["kid_mean"], one["kid_std"]), rel=1e-9)
    assert run.stdout.count("FID") == 1  # only rank 0 reports
