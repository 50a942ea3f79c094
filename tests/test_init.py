"""`neon init`: from your own pipeline folder and your own images to a config that `neon run` finishes on a CPU in
minutes, with the offline detector, statistics that record it, and the estimated cost printed first."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from neon import cli
from neon.init import N_MIN, family_of, size_run
from neon.metrics import load_stats

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def neon(*argv, cwd):
    res = subprocess.run([sys.executable, "-m", "neon", *argv], env=ENV, capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A user's folder: their own tiny diffusers pipeline and a folder of their own PNGs."""
    from neon.family import get_family
    root = tmp_path_factory.mktemp("own")
    family = get_family("diffusers")
    family.save(family.tiny("cpu", resolution=8, scheduler="DDIMScheduler"), str(root / "my_pipeline"))
    (root / "my_images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(root / "my_images" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def written(own):
    res = neon("init", "--base", "my_pipeline", "--images", "my_images", "--out", "my_neon.yaml", "--minutes",
               "0.1", "--arg", "num_inference_steps=4", cwd=own)
    return own, res


def test_init_tells_the_family_writes_statistics_of_its_detector_and_prints_the_cost_first(written):
    root, res = written
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("my_neon_ref_stats.npz: statistics of 24 images (inception-v3-compat")
    assert lines[1].startswith("measured here: sampling ")
    assert lines[2].startswith(f"my_neon.yaml: N = {N_MIN} images per stage; estimated sample ")
    assert lines[-1] == "next: neon run my_neon.yaml --out runs/my_neon"
    stats = load_stats(root / "my_neon_ref_stats.npz")
    assert stats.detector == "inception-v3-compat" and stats.count == 24
    text = (root / "my_neon.yaml").read_text()
    assert "family: diffusers" in text and "weights: fid-helper" in text and '"num_inference_steps": 4' in text


def test_the_written_config_runs_to_the_end_on_a_cpu(written):
    root, _ = written
    res = neon("run", "my_neon.yaml", "--out", "runs/my_neon", cwd=root)
    doc = json.loads((root / "runs" / "my_neon" / "run.json").read_text())
    assert list(doc["stages"]) == ["sample", "finetune", "sweep", "final"]
    assert doc["stages"]["sweep"]["selection"]["protocol"] == "adaptive"
    assert doc["stages"]["final"]["neon"]["num_images"] == N_MIN
    assert "stage 4 of 4" in res.stdout


def test_a_budget_sizes_n_between_the_adaptive_minimum_and_the_papers_sweep():
    small, _ = size_run(1.0, 0.1, 0.1, 0.1)
    assert small == N_MIN
    n, seconds = size_run(3600.0, 0.01, 0.02, 0.01)
    assert n % 16 == 0 and N_MIN < n <= 10_000 and sum(seconds.values()) <= 3600.0
    assert size_run(1e9, 0.01, 0.01, 0.01)[0] == 10_000


def test_the_family_is_told_from_the_container_or_asked_for(own, tmp_path, capsys):
    assert family_of(str(own / "my_pipeline")) == "diffusers"
    pickle = tmp_path / "net.pkl"
    pickle.write_bytes(b"\x80\x04N.")                 # a pickle: EDM and IMM both read one
    with pytest.raises(SystemExit) as e:
        cli.main(["init", "--base", str(pickle), "--images", str(own / "my_images"), "--out", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--family" in err and "edm" in err
    assert not (tmp_path / "c.yaml").exists() and not (tmp_path / "c_ref_stats.npz").exists()


def test_a_family_given_for_a_checkpoint_it_does_not_read_is_refused_first(own, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["init", "--family", "edm", "--base", str(own / "my_pipeline"), "--images", str(own / "my_images"),
                  "--out", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "it is for --family diffusers" in err
    assert not (tmp_path / "c.yaml").exists() and not (tmp_path / "c_ref_stats.npz").exists()


def test_an_existing_config_is_kept_without_force(written, capsys):
    root, _ = written
    before = (root / "my_neon.yaml").read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["init", "--base", str(root / "my_pipeline"), "--images", str(root / "my_images"), "--out",
                  str(root / "my_neon.yaml")])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert (root / "my_neon.yaml").read_bytes() == before
