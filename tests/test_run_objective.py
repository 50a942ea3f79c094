"""The sweep's objective is a choice (FID, FD_DINOv2 or KID) and every point records every metric asked for;
the final evaluation of θr and θneon is repeated on K disjoint seed ranges, reported per range, as mean ± std,
and as the paired difference θneon − θr."""
import json
import os
import statistics

import numpy as np
import pytest
import torch
from test_core_run import CONFIG, _run_config
from test_core_sweep import LineFamily, OneWeight

from conftest import fixtures_root
from neon.config import ConfigError, final_seed_ranges, parse_config
from neon.errors import NeonError
from neon.evaluate import FIDMetric
from neon.family import Bundle
from neon.metrics import FeatureExtractor, gaussian_from_features, save_stats
from neon.metrics.testing import random_images
from neon.snapshot_sweep import best_entry
from neon.sweep import SweepConfig, neon_sweep

DINOV2 = fixtures_root() / "dinov2"


def _dinov2_weights() -> str:
    return str(DINOV2 / json.loads((DINOV2 / "config.json").read_text())["weights"])


# -- the objective --------------------------------------------------------------------------------------------

class TwoMinima:
    """An accumulator whose FID is lowest at w = 1 and whose KID is lowest at w = 2 (images encode w)."""

    def __init__(self):
        self.values = []

    def update(self, images, seeds, labels=None):
        self.values.append(images.float().mean().item())

    def finish(self):
        w = (float(np.mean(self.values)) - 100) / 10
        return {"fid": abs(w - 1), "kid_mean": abs(w - 2), "kid_std": 0.0}


def _sweep(objective, tmp_path=None):
    return neon_sweep(LineFamily(), Bundle(net=OneWeight()), {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)},
                      SweepConfig(w=[0.0, 1.0, 2.0, 3.0], num_images=2, batch=2, objective=objective,
                                  search="grid"), TwoMinima,
                 None if tmp_path is None else str(tmp_path / "sweep.json"))


def test_objective_kid_picks_the_lowest_kid_point_not_the_lowest_fid(tmp_path):
    best = _sweep("kid", tmp_path).run()
    assert best["w"] == 2.0 and best["kid_mean"] == 0.0 and best["fid"] == 1.0
    assert _sweep("fid").run()["w"] == 1.0
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert all({"fid", "kid_mean"} <= p.keys() for p in saved["points"])      # every point records both
    assert saved["best"]["w"] == 2.0
    assert (tmp_path / "sweep_kid.png").is_file() and (tmp_path / "sweep_fid.png").is_file()


def test_the_best_snapshot_is_chosen_by_the_objectives_final_value():
    entries = [{"snapshot": "a", "final": {"fid": 1.0, "kid_mean": 0.5}},
               {"snapshot": "b", "final": {"fid": 2.0, "kid_mean": 0.1}}]
    assert best_entry(entries, "fid")["snapshot"] == "a"
    assert best_entry(entries, "kid_mean")["snapshot"] == "b"


@pytest.mark.parametrize("objective, needs", [("kid", "metrics.kid: true"), ("fd_dinov2", "metrics.fd_dinov2")])
def test_an_objective_the_metrics_section_does_not_compute_is_refused_in_one_line(objective, needs):
    with pytest.raises(ConfigError) as info:
        parse_config({**CONFIG, "sweep": {**CONFIG["sweep"], "objective": objective}}, smoke=True)
    assert str(info.value) == f"sweep.objective: {objective!r} is not computed by the metrics section: it needs {needs}"


def test_an_unknown_objective_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^sweep\.objective: expected one of fid, fd_dinov2, kid, got 'is'$"):
        parse_config({**CONFIG, "sweep": {**CONFIG["sweep"], "objective": "is"}}, smoke=True)


def test_fd_dinov2_needs_its_reference_statistics_outside_smoke_runs():
    data = {**CONFIG, "base": "x.pth", "load_args": {}, "metrics": {**CONFIG["metrics"], "fd_dinov2": {"weights": "w"}}}
    parse_config(data, smoke=True)
    with pytest.raises(ConfigError, match=r"^metrics\.fd_dinov2\.ref_stats: needs the reference set's DINOv2"):
        parse_config({k: v for k, v in data.items() if k != "smoke"})


# -- FD_DINOv2 beside FID -------------------------------------------------------------------------------------

def test_fd_dinov2_is_measured_beside_fid_from_the_same_images(tmp_path):
    weights = _dinov2_weights()
    images, ref_images = random_images(6, 32, 32, seed=1), random_images(6, 32, 32, seed=2)
    inception = FeatureExtractor("inception-v3-compat", "fid-helper", device="cpu", logits=False)
    dinov2 = FeatureExtractor("dinov2", weights, device="cpu")
    save_stats(tmp_path / "ref.npz", *gaussian_from_features(inception(ref_images)["pool"]))
    save_stats(tmp_path / "ref_dinov2.npz", *gaussian_from_features(dinov2(ref_images)["pool"]))

    def measure(metric):
        acc = metric()
        acc.update(images[:4], list(range(4)))
        acc.update(images[4:], list(range(4, 6)))
        return acc.finish()
    both = measure(FIDMetric("inception-v3-compat", str(tmp_path / "ref.npz"), "cpu", "fid-helper", False,
                             dinov2_weights=weights, dinov2_ref=str(tmp_path / "ref_dinov2.npz")))
    alone = measure(FIDMetric("inception-v3-compat", str(tmp_path / "ref.npz"), "cpu", "fid-helper", False))
    fd = measure(FIDMetric("dinov2", str(tmp_path / "ref_dinov2.npz"), "cpu", weights))
    assert both["fid"] == pytest.approx(alone["fid"], rel=1e-9) and "fd_dinov2" not in alone
    assert both["fd_dinov2"] == pytest.approx(fd["fid"], rel=1e-9)


def test_fd_dinov2_statistics_of_another_detector_are_refused_in_one_line(tmp_path):
    save_stats(tmp_path / "inception.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(NeonError, match=r"inception\.npz: statistics are 2048-d, the dinov2 detector gives") as info:
        FIDMetric("inception-v3-compat", str(tmp_path / "inception.npz"), "cpu", "fid-helper", False,
                  dinov2_weights=_dinov2_weights(), dinov2_ref=str(tmp_path / "inception.npz"))
    assert "\n" not in str(info.value)


def test_a_missing_fd_dinov2_weights_file_is_refused_before_the_run_folder_exists(tmp_path):
    config = {**CONFIG, "metrics": {**CONFIG["metrics"], "fd_dinov2": {"weights": str(tmp_path / "none.pth")}}}
    res = _run_config(config, tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"metrics.fd_dinov2.weights: weights file {tmp_path / 'none.pth'} not found" in res.stderr
    assert not (tmp_path / "r").exists()


# -- repeats --------------------------------------------------------------------------------------------------

def test_repeats_lay_out_consecutive_disjoint_final_ranges():
    cfg = parse_config({**CONFIG, "final": {**CONFIG["final"], "repeats": 3}}, smoke=True)
    n = CONFIG["final"]["num_images"]
    start = CONFIG["final"]["seed_offset"]
    assert final_seed_ranges(cfg, start) == [(start + k * n, start + (k + 1) * n - 1) for k in range(3)]


def test_the_overlap_check_covers_every_repeated_range():
    sweep_first = CONFIG["sweep"]["seed_offset"]
    n = CONFIG["final"]["num_images"]
    below = sweep_first - n     # the first range ends just below the sweep's seeds; the second runs into them
    one = {**CONFIG, "final": {**CONFIG["final"], "seed_offset": below}}
    parse_config(one, smoke=True)
    with pytest.raises(ConfigError, match=rf"final seeds {sweep_first}–{sweep_first + n - 1} \(repeat 2 of 2\) "
                                          r"overlap the sweep's"):
        parse_config({**one, "final": {**one["final"], "repeats": 2}}, smoke=True)
    with pytest.raises(ConfigError, match=r"^final\.repeats: must be at least 1, got 0$"):
        parse_config({**CONFIG, "final": {**CONFIG["final"], "repeats": 0}}, smoke=True)


# -- one run with them all: objective kid, FD_DINOv2 beside FID, two final seed ranges -------------------------

RUN = {**CONFIG,
       "metrics": {**CONFIG["metrics"], "kid": True, "kid_subsets": 4, "kid_subset_size": 4,
                   "fd_dinov2": {"weights": _dinov2_weights()}},
       "sweep": {**CONFIG["sweep"], "objective": "kid", "snapshot": "last", "refine": None},
       "final": {**CONFIG["final"], "repeats": 2}}


@pytest.fixture(scope="module")
def kid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    res = _run_config(RUN, root, "run")
    assert res.returncode == 0, res.stderr[-2000:]
    return root / "run", res


def test_every_point_records_every_metric_asked_and_the_lowest_kid_is_chosen(kid_run):
    out, _ = kid_run
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["objective"] == "kid_mean"
    for p in sweep["points"]:
        assert all(isinstance(p[k], float) for k in ("fid", "kid_mean", "kid_std", "fd_dinov2"))
    assert sweep["best"]["w"] == min(sweep["points"], key=lambda p: p["kid_mean"])["w"]
    doc = json.loads((out / "run.json").read_text())
    assert doc["stages"]["sweep"]["objective"] == "kid"
    assert doc["stages"]["final"]["neon"]["w"] == sweep["best"]["w"]
    assert (out / "sweep" / f"{os.path.splitext(sweep['best_snapshot'])[0]}_fd_dinov2.png").is_file()


def test_repeats_give_disjoint_ranges_per_model_with_mean_std_and_paired_difference(kid_run):
    out, res = kid_run
    final = json.loads((out / "run.json").read_text())["stages"]["final"]
    n, start = RUN["final"]["num_images"], RUN["final"]["seed_offset"]
    assert final["repeats"] == 2
    for name in ("base", "neon"):
        r = final[name]
        assert [x["seeds"] for x in r["ranges"]] == [[start, start + n - 1], [start + n, start + 2 * n - 1]]
        assert r["seeds"] == [start, start + 2 * n - 1] and all(x["num_images"] == n for x in r["ranges"])
        for key in ("fid", "kid_mean", "fd_dinov2"):
            values = [x[key] for x in r["ranges"]]
            assert r[key] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert r["std"][key] == pytest.approx(statistics.stdev(values), rel=1e-12)
    for key in ("fid", "kid_mean", "fd_dinov2"):
        diffs = [a[key] - b[key] for a, b in zip(final["neon"]["ranges"], final["base"]["ranges"])]
        assert final["delta"][key]["per_range"] == pytest.approx(diffs, rel=1e-12)
        assert final["delta"][key]["mean"] == pytest.approx(statistics.fmean(diffs), rel=1e-12)
        assert final["delta"][key]["std"] == pytest.approx(statistics.stdev(diffs), rel=1e-12)
    assert f"{n} images per range, mean ± std of 2 ranges" in res.stdout and "Δ θneon − θr KID" in res.stdout
    card = (out / "MODEL_CARD.md").read_text()
    assert "Mean ± std over 2 disjoint seed ranges" in card and "| mean ± std |" in card
    assert f"| {start + n}–{start + 2 * n - 1} |" in card and "Best snapshot (lowest final KID)" in card
