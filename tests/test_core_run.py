"""`neon run`: the stages in order, recorded in run.json, each skipped on a rerun once its output exists."""
import json
import os
import subprocess
import sys

import yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

CONFIG = {
    "family": "tinypix",
    "description": "a tiny end-to-end run",
    "load_args": {"num_classes": 3},
    "metrics": {"detector": "inception-v3-compat", "weights": "fid-helper", "inception_score": False},
    "synthetic": {"num_images": 12, "labels": "per_class", "batch": 6, "sampler": {"num_steps": 3}},
    "finetune": {"lr": 1e-3, "batch": 4, "total_images": 24, "snapshot_every_images": 12, "log_every_images": 4,
                 "ema": {"beta": 0.5}},
    "sweep": {"w": [0.0, 1.0, 2.0], "num_images": 6, "batch": 6, "seed_offset": 100, "refine": 0.5},
    "final": {"num_images": 9, "batch": 6, "seed_offset": 1000},
}


def _run(config_path, out):
    return subprocess.run([sys.executable, "-m", "neon", "run", str(config_path), "--smoke", "--out", str(out)],
                          env=ENV, capture_output=True, text=True)


def test_run_records_every_stage_and_a_rerun_skips_them(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    first = _run(tmp_path / "tiny.yaml", tmp_path / "run")
    assert first.returncode == 0, first.stderr[-2000:]
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert list(doc["stages"]) == ["sample", "finetune", "sweep", "final"]
    assert doc["config"]["family"] == "tinypix" and doc["versions"]["torch"].startswith("2.14.1")
    assert len(doc["stages"]["finetune"]["snapshots"]) == 2
    sweep = json.loads((tmp_path / "run" / "sweep.json").read_text())
    best = sweep["best"]["w"]
    grid = [p for p in sweep["points"] if p["w"] in (0.0, 1.0, 2.0)]
    grid_best = min(grid, key=lambda p: p["fid"])["w"]
    assert {p["w"] for p in sweep["points"]} == {0.0, 1.0, 2.0, grid_best - 0.5, grid_best + 0.5}  # grid, ± refine
    final = doc["stages"]["final"]
    assert final["neon"]["w"] == best and final["base"]["w"] == 0 and final["neon"]["num_images"] == 9
    assert "base:" in first.stdout and "neon:" in first.stdout

    again = _run(tmp_path / "tiny.yaml", tmp_path / "run")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sampling" not in again.stderr and "self-training" not in again.stderr and "w=" not in again.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["stages"] == doc["stages"]


def test_missing_base_checkpoint_is_one_line(tmp_path):
    config = dict(CONFIG, base=str(tmp_path / "nope.pth"), load_args={})   # num_classes is the tiny network's
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "nope.pth not found" in res.stderr and res.stderr.count("\n") == 1
