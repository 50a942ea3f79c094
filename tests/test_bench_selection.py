"""bench/bench_selection.py on a tiny toy setting: what it counts, what it returns, what it prints (no timings)."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from experiments.toy.experiment import QUICK, grid
from neon.adaptive import Point

PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_selection.py"


def load_bench():
    """bench/ is not a package: load the script as a module (registered first, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("bench_selection", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def tiny() -> "bench.BenchSettings":
    """The bench's logic at toy sizes: for checks of plumbing, not of outcomes."""
    ar = dataclasses.replace(QUICK.ar, base_epochs=100, n_synthetic=512, finetune_epochs=(2, 5), w=grid(-1, 1, 9))
    diffusion = dataclasses.replace(QUICK.diffusion, base_steps=20, n_synthetic=64, finetune_steps=(2, 3),
                                    w=grid(-1, 1, 5))
    return bench.BenchSettings(toy=dataclasses.replace(QUICK, ar=ar, diffusion=diffusion), n_sweep=640,
                               n_final=3200, n_report_diffusion=2000, n_report_ar=2000)


@pytest.fixture(scope="module")
def result():
    return bench.run_bench(tiny(), seed=0, threads=1, progress=False)


def scale_case(snapshots: int = 2) -> "bench.Case":
    """A case with no network: θneon scales the noise by (1+w)·1 − w·s (θs's s = 2, 3, ...)."""
    theta_r = {"scale": torch.tensor(1.0)}
    snaps = [(10 * (k + 1), {"scale": torch.tensor(2.0 + k)}) for k in range(snapshots)]
    return bench.Case("scale", "ar", 1.0, theta_r, snaps, (-1.0, 0.0, 1.0), lambda sd, x: sd["scale"] * x,
                      bench.toy_inputs(0, "ar", 1.0))


def test_official_images_equal_the_formula(result):
    s = result["settings"]
    for r in result["cases"]:
        k, n_w = len(r["lengths"]), len(r["w"])
        assert r["official"]["images"] == k * n_w * s["n_sweep"] + k * s["n_final"]


def test_new_images_are_each_networks_largest_n_with_theta_r_once():
    case = scale_case()
    measure = bench.Measure(case, torch.randn(640, 2))
    measure(Point(0, 2, None), 40)
    measure(Point(0, 2, None), 80)       # raising 40 -> 80 costs 40 more
    measure(Point(0, 1, None), 40)       # w = 0: θr ...
    measure(Point(1, 1, None), 40)       # ... whatever the snapshot
    measure(Point(1, 0, None), 160)
    assert measure.images == 80 + 40 + 160


def test_new_measurements_use_the_first_n_rows_of_the_same_noise():
    case = scale_case()
    select = torch.randn(640, 2)
    measure = bench.Measure(case, select)
    measure(Point(0, 2, None), 40)
    grown = measure.first(Point(0, 2, None), 80)
    assert torch.equal(grown, case.draw(case.theta_neon(0, 1.0), select[:80]))


def test_ratio_is_new_over_official_images(result):
    for r in result["cases"]:
        assert r["ratio"] == r["new"]["images"] / r["official"]["images"]
        assert 0 < r["new"]["images"] <= r["official"]["images"]


def test_choices_lie_on_the_grid_and_the_snapshots(result):
    for r in result["cases"]:
        for protocol in ("official", "new"):
            chosen = r[protocol]
            assert chosen["w"] in r["w"]
            assert chosen["length"] == r["lengths"][chosen["snapshot"]]


def test_the_same_choice_gives_a_zero_difference_with_zero_std():
    case = scale_case()
    truth = bench.report(case, dict(theta_r=(0, 0.0), official=(1, -1.0), new=(1, -1.0)), torch.randn(800, 2))
    assert truth["difference"] == 0.0 and truth["difference_std"] == 0.0
    assert truth["fid"]["new"] == truth["fid"]["official"]


def test_a_case_passes_only_with_a_small_ratio_and_a_new_choice_not_worse(result):
    for r in result["cases"]:
        f = r["report"]
        not_worse = f["difference"] <= 0 or f["difference"] < bench.Z * f["difference_std"]
        assert r["not_worse"] == not_worse
        assert r["passed"] == (r["ratio"] <= bench.GOAL_RATIO and not_worse)
    assert result["passed"] == sum(r["passed"] for r in result["cases"])


def test_the_table_has_a_line_per_case_and_a_summary(result):
    table = bench.format_table(result)
    for r in result["cases"]:
        line = next(x for x in table.splitlines() if x.startswith(r["case"]))
        assert line.endswith("PASS" if r["passed"] else "FAIL")
    assert table.splitlines()[-1].startswith(f"summary: {result['passed']}/{len(result['cases'])} cases PASS")
    assert {r["family"] for r in result["cases"]} == {"diffusion", "ar"}


# -- the Fashion-MNIST study cases, on a smoke study over fake Fashion-MNIST files ---------------------------------

@pytest.fixture(scope="module")
def study_case(tmp_path_factory):
    from test_study import config_with, write_fake_split

    from experiments.fashion_mnist.config import load_study

    tmp = tmp_path_factory.mktemp("bench_study")
    write_fake_split(tmp, "train", 600, seed=0)
    write_fake_split(tmp, "test", 200, seed=1)
    config = config_with(tmp, data_root=str(tmp))
    sb = bench.StudyBench("smoke study", config, "study", n_sweep=64, n_final=128, n_report=96)
    return bench.study_case(sb, str(tmp), smoke=True), sb, load_study(config, smoke=True).study


def test_a_study_case_chooses_among_every_logged_snapshot_and_the_study_grid(study_case):
    case, _, cfg = study_case
    lengths = [length for length, _ in case.snapshots]
    every = cfg.selftrain.log_every_images
    assert lengths == list(range(every, cfg.selftrain.total_images + 1, every))
    assert case.w == tuple(sorted({0.0, *cfg.sweep.ode}))


def test_a_study_case_gives_a_seed_the_same_image_whatever_the_cut(study_case):
    case, _, _ = study_case
    seeds = case.inputs("select", 30)
    whole = case.draw(case.theta_r, seeds)
    cut = torch.cat([case.draw(case.theta_r, seeds[:13]), case.draw(case.theta_r, seeds[13:])])
    assert whole.shape == (30, case.reference[0].shape[0])
    torch.testing.assert_close(cut, whole, rtol=1e-4, atol=1e-4)   # batch composition changes rounding only
    assert not torch.equal(case.draw(case.theta_r, seeds[1:2]), whole[:1])   # another seed, another image


def test_a_study_case_runs_both_protocols_on_disjoint_seed_ranges(study_case):
    case, sb, _ = study_case
    ranges = {p: set(case.inputs(p, 200).tolist()) for p in ("select", "final", "report")}
    assert not ranges["select"] & ranges["final"] and not ranges["select"] & ranges["report"]
    r = bench.run_case(case, sb.n_sweep, sb.n_final, sb.n_report)
    k, n_w = len(case.snapshots), len(case.w)
    assert r["official"]["images"] == k * n_w * sb.n_sweep + k * sb.n_final
    assert 0 < r["new"]["images"] <= r["official"]["images"]
    assert r["report"]["n"] == sb.n_report
