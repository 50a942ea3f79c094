"""`neon run configs/fashion_mnist_16.yaml --smoke`: the whole Fashion-MNIST study end to end on CPU, its outputs,
its pairing, and its stage cache (a rerun skips finished stages; a changed setting redoes only what depends on it).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments.fashion_mnist.config import KIND
from experiments.fashion_mnist.datasets import DEFAULT_ROOT, INSTALL_HINT, write_idx
from neon.cli import main as neon_main
from neon.config import config_kind
from neon.images import NpzImages
from neon.run import RUNNERS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fashion_mnist_16.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def config_with(tmp_path, name="study.yaml", **study_overrides) -> str:
    """The repository's config with some `study:` fields replaced (and the smoke section kept)."""
    data = yaml.safe_load(CONFIG.read_text())
    data["study"].update(study_overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def write_fake_split(root, split: str, n: int, seed: int) -> None:
    """Fashion-MNIST-shaped idx files: a bright square whose place depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 2 * (c // 5) * 5, 2 + 4 * (c % 5)
        images[i, r:r + 8, col:col + 8] = 220
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    write_fake_split(root, "train", 1200, seed=0)
    write_fake_split(root, "test", 300, seed=1)
    return str(root)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, fake_root):
    tmp = tmp_path_factory.mktemp("study")
    config = config_with(tmp, data_root=fake_root)
    out = tmp / "run"
    neon_main(["run", config, "--smoke", "--out", str(out)])
    return config, out


def test_config_is_a_study_config_and_its_kind_is_registered():
    assert config_kind(str(CONFIG)) == KIND
    assert RUNNERS.get(KIND) is run_study_entry()


def run_study_entry():
    from experiments.fashion_mnist import run_study
    return run_study


def test_smoke_run_writes_table_json_and_plots(smoke_run):
    _, out = smoke_run
    doc = json.loads((out / "study.json").read_text())
    smoke = yaml.safe_load(CONFIG.read_text())["smoke"]["study"]
    assert doc["smoke"] is True
    assert set(doc["arms"]) == {"ode", "control", "diverse"}
    for arm in doc["arms"]:
        rows = doc["arms"][arm]["rows"]                                 # the grid, on the validation range
        assert [r["w"] for r in rows] == sorted(set(smoke["sweep"][arm]) | {0.0})
        assert all(np.isfinite(r["classifier_fd"]) and np.isfinite(r["pixel_fd"]) for r in rows)
        assert next(r for r in rows if r["w"] == 0)["classifier_fd_diff"] == 0.0   # w = 0 is θr itself
        chosen = doc["arms"][arm]["chosen"]                             # the chosen w, on the report ranges
        assert len(chosen["classifier_fd_values"]) == smoke["evaluation"]["repeats"]
        assert np.isfinite(chosen["classifier_fd"]["mean"]) and chosen["classifier_fd"]["std"] >= 0
    assert 0 <= doc["classifier"]["test_accuracy"] <= 1
    assert set(doc["criterion"]) >= {"required_ratio", "chosen_w", "ratio", "met"}
    table = (out / "table.md").read_text()
    assert "classifier FD" in table and "FID" not in table and "success criterion" in table
    for png in ("fd_vs_w.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_smoke_run_reports_every_baseline_beside_neon(smoke_run):
    _, out = smoke_run
    doc = json.loads((out / "study.json").read_text())
    smoke = yaml.safe_load(CONFIG.read_text())["smoke"]["study"]
    assert set(doc["baselines"]) == {"finetune_real", "selftrained"}
    assert (doc["baselines"]["finetune_real"]["point"], doc["baselines"]["selftrained"]["point"]) == \
        ("control_w-1", "ode_w-1")                                     # each arm's fine-tuned θ, unmerged
    guidance = doc["guidance"]
    assert [r["omega"] for r in guidance["guided"]["rows"]] == sorted(set(smoke["sweep"]["guided"]) | {0.0})
    assert [r["omega"] for r in guidance["neon_guided"]["rows"]] == sorted(set(smoke["sweep"]["neon_guided"]) | {0.0})
    assert guidance["neon_guided"]["neon_w"] == doc["arms"]["ode"]["chosen"]["w"]
    assert len(guidance["neon_guided"]["vs_neon"]["classifier_fd_values"]) == smoke["evaluation"]["repeats"]
    models = [r["model"] for r in doc["comparison"]]
    assert models[:2] == ["θr", "Neon (S from the ODE sampler)"] and len(models) == 8
    assert {"continued fine-tuning on real images (control θ)", "continued fine-tuning on S (θs)",
            "θr guided by θs", "Neon + θs guidance"} <= set(models)
    for r in doc["comparison"]:
        assert len(r["classifier_fd_values"]) == smoke["evaluation"]["repeats"]
    table = (out / "table.md").read_text()
    for name in models + ["classifier-free guidance", "network evaluations per image"]:
        assert name in table
    # Guidance evaluates θr and θs at every step: twice the network evaluations, counted, not assumed.
    assert doc["guidance_cost"]["network_evaluations_ratio"] == 2.0
    assert doc["guidance_cost"]["sampling_cpu_ratio"] > 0


def test_every_choice_is_the_best_grid_point_on_the_validation_range(smoke_run):
    _, out = smoke_run
    doc = json.loads((out / "study.json").read_text())
    sweeps = [(doc["arms"][arm], "w") for arm in doc["arms"]] + [(doc["guidance"][g], "omega") for g in doc["guidance"]]
    for sweep, axis in sweeps:
        best = min(sweep["rows"], key=lambda r: (r["classifier_fd"], abs(r[axis])))
        assert sweep["chosen"][axis] == best[axis]


def test_guided_baseline_at_omega_0_is_theta_r_exactly(smoke_run):
    _, out = smoke_run
    base = NpzImages(str(out / "eval" / "validation" / "base_w0.npz"))
    guided = NpzImages(str(out / "eval" / "validation" / "guided_o0.npz"))
    assert np.array_equal(guided.read(0, len(guided)), base.read(0, len(base)))
    doc = json.loads((out / "study.json").read_text())
    w0 = next(r for r in doc["guidance"]["guided"]["rows"] if r["omega"] == 0)
    theta_r = next(r for r in doc["arms"]["ode"]["rows"] if r["w"] == 0)
    assert w0.pop("omega") == theta_r.pop("w") == 0 and w0 == theta_r   # the same FDs, bit for bit


def test_every_model_is_evaluated_on_the_same_seeds_and_labels(smoke_run):
    _, out = smoke_run
    for where in ("validation", "report"):
        files = sorted((out / "eval" / where).glob("*.npz"))
        base = NpzImages(str(out / "eval" / where / "base_w0.npz"))
        assert len(files) > 1
        for f in files:
            s = NpzImages(str(f))
            assert np.array_equal(s.seeds, base.seeds) and np.array_equal(s.labels, base.labels)
            assert s.shape[1:] == (16, 16, 1)
        assert len(np.unique(base.seeds)) == len(base.seeds)           # no seed in two report ranges


def test_validation_and_report_seed_ranges_are_disjoint(smoke_run):
    _, out = smoke_run
    doc = json.loads((out / "study.json").read_text())
    ranges = doc["evaluation"]["ranges"]
    smoke = yaml.safe_load(CONFIG.read_text())["smoke"]["study"]
    assert len(ranges) == 1 + smoke["evaluation"]["repeats"] and "validation" in ranges
    seeds = [set(range(first, last + 1)) for first, last in ranges.values()]
    assert sum(map(len, seeds)) == len(set().union(*seeds))
    validation = set(NpzImages(str(out / "eval" / "validation" / "base_w0.npz")).seeds.tolist())
    report = set(NpzImages(str(out / "eval" / "report" / "base_w0.npz")).seeds.tolist())
    assert validation and report and not validation & report


def test_rerun_skips_every_finished_stage(smoke_run, capsys):
    config, out = smoke_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".pth", ".npz", ".pt")}
    first = json.loads((out / "study.json").read_text())
    capsys.readouterr()
    neon_main(["run", config, "--smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "base: training" not in printed and "eval " not in printed
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    again = json.loads((out / "study.json").read_text())
    assert again["arms"] == first["arms"]


def test_changed_evaluation_setting_redoes_only_the_evaluation(smoke_run, tmp_path, capsys):
    config, out = smoke_run
    data = yaml.safe_load(Path(config).read_text())
    data["smoke"]["study"]["evaluation"]["seed_offset"] = 500
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    theta_r = json.loads((out / "run.json").read_text())["stages"]["base"]["theta_r"]
    stamp = os.stat(theta_r).st_mtime_ns
    capsys.readouterr()
    neon_main(["run", str(changed), "--smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "base: training" not in printed and re.search(r"eval +validation +base_w0", printed)
    assert os.stat(theta_r).st_mtime_ns == stamp
    assert NpzImages(str(out / "eval" / "report" / "base_w0.npz")).seeds.min() == 500


@pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason=f"needs `{INSTALL_HINT}`")
def test_smoke_config_runs_on_the_installed_dataset(tmp_path):
    from experiments.fashion_mnist import run_study
    doc = run_study(str(CONFIG), str(tmp_path / "run"), smoke=True)
    assert doc["smoke"] and set(doc["arms"]) == {"ode", "control", "diverse"}
    assert (tmp_path / "run" / "fd_vs_w.png").read_bytes()[:8] == PNG
