"""Each family's images are the same on one and two processes: `neon sample --tiny` on two gloo processes writes
the same bytes as one process, with the batched sampler at the same --batch, and with --batch-invariant at
another --batch."""
import os
import subprocess
import sys

import numpy as np
import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# family -> (sampler arguments, batch on one process, batch on two with --batch-invariant); small counts, every
# code path of the sampler
CASES = {
    "edm": (["--arg", "num_steps=3"], 7, 3),
    "var": (["--arg", "cfg=1.5", "--arg", "top_k=5", "--arg", "top_p=0.9"], 7, 1),
    "xar": (["--arg", "cfg=2.0", "--arg", "flow_steps=3"], 5, 1),
    "imm": (["--arg", "steps=2", "--arg", "cfg=1.5"], 3, 1),
    "diffusers": (["--arg", "num_inference_steps=3", "--load-arg", "num_classes=10"], 7, 2),
}
NUM_IMAGES = 7
BATCH = 3   # the batched path: 3 batches (3, 3, 1), dealt 2 : 1 to the two processes


def _sample(family, out, batch, procs, extra):
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, "-m", "neon", "sample", "--family", family, "--tiny", "--num-images", str(NUM_IMAGES),
           "--batch", str(batch), "--out", str(out), *extra]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return np.load(out)


def _same_sets(one, two):
    assert one["arr_0"].shape[0] == NUM_IMAGES and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["seeds"], two["seeds"])
    assert np.array_equal(one.get("arr_1"), two.get("arr_1"))
    assert np.array_equal(one["arr_0"], two["arr_0"])


@pytest.mark.parametrize("family", sorted(CASES))
def test_one_process_and_two_give_the_same_images_with_the_batched_sampler(family, tmp_path):
    extra = CASES[family][0]
    _same_sets(_sample(family, tmp_path / "one.npz", BATCH, 1, extra),
               _sample(family, tmp_path / "two.npz", BATCH, 2, extra))


@pytest.mark.parametrize("family", sorted(CASES))
def test_batch_invariant_images_are_the_same_at_another_batch_on_two_processes(family, tmp_path):
    extra, batch_one, batch_two = CASES[family]
    extra = [*extra, "--batch-invariant"]
    _same_sets(_sample(family, tmp_path / "one.npz", batch_one, 1, extra),
               _sample(family, tmp_path / "two.npz", batch_two, 2, extra))
