"""Each family's images depend on their seeds alone: `neon sample --tiny` on two gloo processes, with another
batch size, writes the same bytes as one process."""
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# family -> (sampler arguments, batch on one process, batch on two); small counts, every code path of the sampler
CASES = {
    "edm": (["--arg", "num_steps=3"], 7, 3),
    "var": (["--arg", "cfg=1.5", "--arg", "top_k=5", "--arg", "top_p=0.9"], 7, 1),
    "xar": (["--arg", "cfg=2.0", "--arg", "flow_steps=3"], 5, 1),
    "imm": (["--arg", "steps=2", "--arg", "cfg=1.5"], 3, 1),
}


def _sample(family, out, batch, procs, extra):
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, "-m", "neon", "sample", "--family", family, "--tiny", "--num-images", "7", "--batch",
           str(batch), "--out", str(out), *extra]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return np.load(out)


@pytest.mark.parametrize("family", sorted(CASES))
def test_one_process_and_two_give_the_same_images(family, tmp_path):
    extra, batch_one, batch_two = CASES[family]
    one = _sample(family, tmp_path / "one.npz", batch_one, 1, extra)
    two = _sample(family, tmp_path / "two.npz", batch_two, 2, extra)
    assert one["arr_0"].shape[0] == 7 and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["seeds"], two["seeds"])
    assert np.array_equal(one.get("arr_1"), two.get("arr_1"))
    assert np.array_equal(one["arr_0"], two["arr_0"])
