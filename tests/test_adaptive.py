"""The adaptive selection protocol (neon/adaptive.py): on simulated surfaces whose truth is known, and in a run
(`sweep.search: adaptive`): deterministic, resumable from its log, the same on 1 or 2 processes."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments.selection.simulate import Surface, adaptive, bowl, official
from neon.adaptive import Adaptive, Estimate, Point, paired
from neon.metrics.frechet import frechet_distance, gaussian_from_features
from neon.metrics.jackknife import frechet_jackknife

W = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]
G = [1.0, 1.5, 2.0, 2.5, 3.0]


def test_the_jackknife_leaves_each_group_out_exactly():
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu_r, sigma_r = np.zeros(3), np.eye(3)
    value, jack = frechet_jackknife(x, mu_r, sigma_r, 4)
    assert value == pytest.approx(frechet_distance(*gaussian_from_features(x), mu_r, sigma_r), rel=1e-12)
    for k, (a, b) in enumerate([(0, 15), (15, 30), (30, 45), (45, 60)]):
        rest = torch.cat([x[:a], x[b:]])
        assert jack[k] == pytest.approx(frechet_distance(*gaussian_from_features(rest), mu_r, sigma_r), rel=1e-9)


def test_a_paired_difference_is_far_less_noisy_than_either_value():
    surface = Surface(bowl(W, None, 1, 0.5), 1, W, None)
    m = surface.measure()
    a, b = m(Point(0, 4, None), 512), m(Point(0, 5, None), 512)
    _, s_ab = paired(a, b)
    _, s_a = paired(a, Estimate(0.0, (0.0,) * len(a.jackknife), a.n))   # a's own jackknife std
    assert 0 < s_ab < s_a / 2


@pytest.mark.parametrize("position", [0.0, 0.5, 1.0])
def test_it_finds_the_optimum_anywhere_on_the_grid_with_a_tenth_of_the_images(position):
    truth = bowl(W, G, 3, position)
    a = adaptive(Surface(truth, 3, W, G), 4096)
    o = official(Surface(truth, 3, W, G), 4096, 5 * 4096)
    best = min(truth(s, w, g) for s in range(3) for w in W for g in G)
    assert a.true_fid <= best * 1.01
    assert a.images <= 0.1 * o.images
    if position == 1.0:   # the optimum at the grid's edge: the walk reaches it
        assert a.choice[1] >= W[-2]


def test_same_seeds_make_the_same_choice_and_another_seed_may_not_change_it_much():
    truth = bowl(W, G, 3, 0.3)
    one, two = adaptive(Surface(truth, 3, W, G, seed=3), 2048), adaptive(Surface(truth, 3, W, G, seed=3), 2048)
    assert (one.choice, one.images) == (two.choice, two.images)


def test_a_flat_surface_returns_theta_r_without_spending_the_budget():
    """θs ≈ θr: every w gives the same images' statistics up to noise far below the band."""
    flat = Surface(lambda s, w, g: 1.5, 2, W, None, tau=1e-4)
    log = []
    measure = flat.measure()
    choice = Adaptive(lambda p, n: log.append(n) or measure(p, n), 2, W, None, 256, 4096).run()
    assert W[choice.point.w] == 0.0 and choice.decided
    assert max(log) < 4096 and flat.sampled < 0.25 * 2 * 4096


def test_a_noisy_surface_asks_for_more_images_rather_than_deciding():
    """Two points whose true difference is below the noise at the screening count: the race goes on."""
    noisy = Surface(lambda s, w, g: 1.0 + 0.004 * (w - 1.0) ** 2, 1, [0.75, 1.0, 1.25], None, tau=1.0)
    log = []
    measure = noisy.measure()
    Adaptive(lambda p, n: log.append(n) or measure(p, n), 1, [0.75, 1.0, 1.25], None, 64, 4096,
             indifference=0.0).run()
    assert max(log) > 64


def test_a_walk_replayed_from_its_measurements_makes_the_same_choice():
    truth = bowl(W, G, 2, 0.6)
    measure, seen = Surface(truth, 2, W, G).measure(), {}

    def recording(p, n):
        seen[(p, n)] = measure(p, n)
        return seen[(p, n)]
    first = Adaptive(recording, 2, W, G, 256, 4096).run()
    replay = Adaptive(lambda p, n: seen[(p, n)], 2, W, G, 256, 4096).run()
    assert (replay.point, replay.decided) == (first.point, first.decided)


# ---------------------------------------------------------------------------------------------------------
# In a run: the tiny pixel family (tests/conftest.py registers it), search: adaptive.

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CONFIG = {
    "family": "tinypix",
    "description": "adaptive selection on a tiny run",
    "load_args": {"num_classes": 3},
    "metrics": {"detector": "inception-v3-compat", "weights": "fid-helper", "inception_score": False},
    "synthetic": {"num_images": 12, "labels": "per_class", "batch": 6, "sampler": {"num_steps": 3}},
    "finetune": {"lr": 0.05, "batch": 4, "total_images": 24, "snapshot_every_images": 12, "log_every_images": 4,
                 "ema": {"beta": 0.5}},
    "sweep": {"w": [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0], "num_images": 48, "start_images": 12, "groups": 4,
              "batch": 12, "seed_offset": 100, "snapshot": "all", "search": "adaptive"},
    "final": {"num_images": 9, "batch": 6, "seed_offset": 1000, "base_sampler": {"num_steps": 2}},
}


def _run(folder, out, nproc=1):
    (folder / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    cmd = ["-m", "neon", "run", str(folder / "c.yaml"), "--smoke", "--out", str(out)]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    res = subprocess.run([sys.executable, *cmd], env=ENV, capture_output=True, text=True, cwd=folder)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _choice(out):
    doc = json.loads((out / "run.json").read_text())
    log = json.loads((out / "sweep" / "selection.json").read_text())
    strip = lambda e: {k: v for k, v in e.items() if k != "seconds"}
    return doc["stages"]["sweep"]["best"], [strip(e) for e in log["evaluations"]], strip(doc["stages"]["final"]["neon"])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    res = _run(root, root / "run")
    return root, root / "run", res


def test_a_run_records_every_measurement_and_what_the_choice_cost(whole):
    _, out, res = whole
    doc = json.loads((out / "run.json").read_text())
    selection = doc["stages"]["sweep"]["selection"]
    log = json.loads((out / "sweep" / "selection.json").read_text())
    assert selection["protocol"] == "adaptive" and selection["evaluations"] == len(log["evaluations"])
    assert all({"n", "value", "std", "jackknife", "sampled"} <= e.keys() for e in log["evaluations"])
    assert log["choice"]["chosen"]["w"] == doc["stages"]["sweep"]["best"]["w"]
    assert "selection: adaptive" in res.stdout
    card = (out / "MODEL_CARD.md").read_text()
    assert "selection: adaptive" in card and f"{selection['images']:,} images" in card


def _without_selection(out, to, keep: float = 0.0):
    """A copy of the run folder `out` at `to` as a run killed during its selection leaves it: S and θs done, the
    first `keep` of the selection's log written (it is rewritten atomically after every measurement), nothing
    else of the sweep recorded, and the racing points' features lost with the process."""
    shutil.copytree(out, to)
    log_path = to / "sweep" / "selection.json"
    log = json.loads(log_path.read_text())
    log["evaluations"] = log["evaluations"][:int(len(log["evaluations"]) * keep)]
    del log["choice"]
    log_path.write_text(json.dumps(log))
    doc = json.loads((to / "run.json").read_text().replace(str(out), str(to)))
    for stage in ("sweep", "final"):
        doc["stages"].pop(stage)
    (to / "run.json").write_text(json.dumps(doc))
    for f in list((to / "sweep").glob("*-final.json")) + [to / "neon.pth"]:
        f.unlink()


def test_resuming_from_a_log_cut_short_equals_the_uninterrupted_run(whole, tmp_path):
    _, out, _ = whole
    _without_selection(out, tmp_path / "run", keep=0.5)
    _run(tmp_path, tmp_path / "run")
    assert _choice(tmp_path / "run") == _choice(out)


def test_a_selection_killed_with_sigkill_resumes_to_the_uninterrupted_choice(whole, tmp_path):
    """A real kill -9 in the middle of the walk (after half of its measurements are logged), then the same
    command again: the same measurements, the same choice, the same final evaluation."""
    import signal
    import time
    _, out, _ = whole
    total = len(json.loads((out / "sweep" / "selection.json").read_text())["evaluations"])
    _without_selection(out, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    log_path = tmp_path / "run" / "sweep" / "selection.json"
    proc = subprocess.Popen([sys.executable, "-m", "neon", "run", str(tmp_path / "c.yaml"), "--smoke", "--out",
                             str(tmp_path / "run")], env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    logged = 0
    while proc.poll() is None and logged < total // 2:
        time.sleep(0.02)
        try:
            logged = len(json.loads(log_path.read_text())["evaluations"])
        except (OSError, ValueError):   # not written yet
            pass
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(json.loads(log_path.read_text())["evaluations"]) < total
    _run(tmp_path, tmp_path / "run")
    assert _choice(tmp_path / "run") == _choice(out)


def test_two_processes_measure_and_choose_what_one_does(whole, tmp_path):
    """The selection on 2 processes from the same θs snapshots: the same measurements, the same choice."""
    _, out, _ = whole
    _without_selection(out, tmp_path / "two")
    _run(tmp_path, tmp_path / "two", nproc=2)
    assert _choice(tmp_path / "two") == _choice(out)


def test_adaptive_refuses_what_it_cannot_walk():
    from neon.config import ConfigError, parse_config
    cfg = copy.deepcopy(CONFIG)
    cfg["sweep"]["grid"] = {"num_steps": [2, 3]}
    with pytest.raises(ConfigError, match=r"sweep\.grid: search: adaptive walks one setting"):
        parse_config(cfg, smoke=True)
    cfg = copy.deepcopy(CONFIG)
    cfg["sweep"]["tolerance"] = 0.1
    with pytest.raises(ConfigError, match=r"sweep\.tolerance: not used by search: adaptive"):
        parse_config(cfg, smoke=True)
    cfg = copy.deepcopy(CONFIG)
    del cfg["sweep"]["search"]
    assert parse_config(cfg, smoke=True).sweep.search == "adaptive"   # a user's config gets it by default


def test_neon_sweep_chooses_among_snapshots_on_the_command_line(whole, tmp_path):
    _, run, _ = whole
    snapshots = sorted(str(p) for p in (run / "finetune").glob("snapshot-*.pth"))
    s = CONFIG["sweep"]
    argv = ["-m", "neon", "sweep", "--family", "tinypix", "--tiny", "--load-arg", "num_classes=3",
            "--synth", *snapshots, "--ref-stats", str(run / "smoke_ref_stats.npz"), "--detector-weights",
            "fid-helper", "--out", str(tmp_path / "cli"), "--w", *map(str, s["w"]), "--num-images",
            str(s["num_images"]), "--start-images", str(s["start_images"]), "--batch", str(s["batch"])]
    res = subprocess.run([sys.executable, *argv], env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    log = json.loads((tmp_path / "cli" / "selection.json").read_text())
    names = {Path(p).stem for p in snapshots} | {"θr"}
    assert {e["snapshot"] for e in log["evaluations"]} <= names
    assert sum(e["w"] == 0 and e["n"] == s["start_images"] for e in log["evaluations"]) == 1   # θr measured once
    chosen = log["choice"]["chosen"]
    assert chosen["snapshot"] in names and chosen["w"] in s["w"]
    assert res.stdout.strip().splitlines()[-1].startswith(f"best: {chosen['snapshot']} w={chosen['w']:g} ")
    assert log["choice"]["images"] <= len(snapshots) * len(s["w"]) * s["num_images"]


def test_neon_sweep_walks_one_snapshot_unless_adaptive(whole, tmp_path, capsys):
    from neon import cli
    _, run, _ = whole
    snapshots = sorted(str(p) for p in (run / "finetune").glob("snapshot-*.pth"))
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--family", "tinypix", "--tiny", "--load-arg", "num_classes=3", "--synth", *snapshots,
                  "--ref-stats", str(run / "smoke_ref_stats.npz"), "--out", str(tmp_path / "g"), "--w", "0", "1",
                  "--search", "grid"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "--synth" in err and "--search adaptive" in err
    assert not (tmp_path / "g").exists()
