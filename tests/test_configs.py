"""Every config in configs/ validates, and `neon run CONFIG --smoke` runs all its stages on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neon.config import METHOD_KIND, ConfigError, config_kind, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
PAPER_ROWS = [c for c in CONFIGS if config_kind(str(c)) == METHOD_KIND]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_there_is_one_config_per_paper_row():
    names = {c.stem for c in PAPER_ROWS}
    assert {"edm_cifar10_cond", "edm_cifar10_uncond", "edm_ffhq64", "var_d16_256", "var_d36_512", "xar_b_256",
            "xar_l_256", "imm_in256"} <= names


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_config_validates_as_is_and_with_smoke(config):
    cfg = load_config(str(config))
    assert cfg.base and cfg.ref_stats, "a paper row names its base checkpoint and reference statistics"
    smoke = load_config(str(config), smoke=True)
    assert smoke.base is None


def test_bad_fields_are_named_in_one_line(tmp_path):
    cases = [({"family": "edm", "finetune": {"lr": "fast"}}, r"finetune\.lr: expected a number"),
             ({"family": "edm", "sweep": {"ww": [0]}}, r"sweep\.ww: unknown field"),
             ({"synthetic": {"num_images": 4}}, r"family: required field is missing"),
             ({"family": "edm", "synthetic": {"num_images": 4, "labels": "some"}}, r"synthetic\.labels"),
             ({"family": "edm", "finetune": {"ema": {"decay": 0.9}}}, r"finetune\.ema")]
    for data, message in cases:
        data.setdefault("synthetic", {"num_images": 4})
        with pytest.raises(ConfigError, match=message) as info:
            parse_config(data)
        assert "\n" not in str(info.value)
    (tmp_path / "bad.yaml").write_text("family: edm\nsweep: {w: [0, 1}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    assert parse_config({"family": "x", "synthetic": {"num_images": 2}, "finetune": {"lr": "1e-5"}}).finetune.lr == 1e-5


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_smoke_run_goes_through_every_stage(config, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(config), "--smoke", "--out", str(out)],
                         env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "run.json").read_text())
    assert set(doc["stages"]) == {"sample", "finetune", "sweep", "final"} and doc["smoke"] is True
    assert doc["stages"]["final"]["neon"]["fid"] is not None
    for name in ("synthetic.npz", "sweep.json", "sweep.png"):
        assert (out / name).is_file(), name
    assert list(out.glob("neon.*")) and list((out / "finetune").glob("snapshot-*"))
