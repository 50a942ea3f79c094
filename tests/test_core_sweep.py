"""The w (× cfg) sweep: merges in memory, early stop, refinement, resume, JSON and plot."""
import json

import numpy as np
import torch

from neon.config import SweepConfig
from neon.family import Arg, Bundle, Family, TrainDefaults
from neon.sweep import neon_sweep


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))


class LineFamily(Family):
    """Images are filled with 100 + 10·p + cfg, so θneon(w) with θr: p=0, θs: p=-1 draws 100 + 10·w + cfg."""
    name = "line"
    train_defaults = TrainDefaults()
    SAMPLER_ARGS = (Arg("cfg", float, 0.0, "added to every pixel"),)

    def sample(self, bundle, seeds, labels, cfg=0.0, **_):
        value = 100 + 10 * bundle.net.p.item() + cfg
        return torch.full((len(seeds), 2, 2, 3), round(value), dtype=torch.uint8)


class DistanceTo:
    """A metric accumulator: |mean pixel − target| (stands in for FID)."""

    def __init__(self, target):
        self.target, self.values = target, []

    def update(self, images, seeds, labels=None):
        self.values.append(images.float().mean().item())

    def finish(self):
        return {"fid": abs(float(np.mean(self.values)) - self.target)}


def _sweep(tmp_path, target, **cfg):
    bundle = Bundle(net=OneWeight())
    theta_s = {"p": torch.tensor(-1.0)}
    return neon_sweep(LineFamily(), bundle, {"p": torch.tensor(0.0)}, theta_s,
                      SweepConfig(num_images=4, batch=2, **{"search": "grid", **cfg}), lambda: DistanceTo(target),
                      str(tmp_path / "sweep.json"))


def test_finds_the_best_w_and_restores_theta_r(tmp_path):
    sweep = _sweep(tmp_path, target=115, w=[0, 0.5, 1, 1.5, 2, 2.5])
    best = sweep.run()
    assert best["w"] == 1.5 and best["fid"] == 0
    assert sweep.scorer.bundle.net.p.item() == 0.0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["w"] for p in doc["points"]] == [0, 0.5, 1, 1.5, 2, 2.5]
    assert doc["best"]["w"] == 1.5 and (tmp_path / "sweep.png").stat().st_size > 1000


def test_early_stop_once_fid_rises_past_the_tolerance(tmp_path):
    sweep = _sweep(tmp_path, target=105, w=[0, 0.5, 1, 1.5, 2, 2.5], tolerance=7)
    sweep.run()
    # FID: 5, 0, 5, 10 -> 10 > 0 + 7 stops the walk; 2 and 2.5 are never evaluated
    assert sorted(p["w"] for p in sweep.points.values()) == [0, 0.5, 1, 1.5]


def test_refines_around_the_best_point(tmp_path):
    sweep = _sweep(tmp_path, target=108, w=[0, 1, 2], refine=0.2)
    best = sweep.run()
    assert sorted(p["w"] for p in sweep.points.values()) == [0, 0.8, 1, 1.2, 2]
    assert best["w"] == 0.8


def test_sweeps_guidance_scale_jointly(tmp_path):
    sweep = _sweep(tmp_path, target=113, w=[0, 0.5, 1], cfg=[1.0, 2.0, 3.0])
    best = sweep.run()
    assert (best["w"], best["cfg"]) == (1.0, 3.0)
    assert len(sweep.points) == 9


def test_a_rerun_reuses_saved_points(tmp_path):
    _sweep(tmp_path, target=110, w=[0, 1]).run()
    calls = []
    sweep = _sweep(tmp_path, target=110, w=[0, 1, 2])
    original = sweep.scorer.family.sample
    sweep.scorer.family.sample = lambda *a, **k: calls.append(1) or original(*a, **k)
    sweep.run()
    assert len(calls) == 2  # only w = 2 was sampled (4 images in batches of 2)
    changed = _sweep(tmp_path, target=110, w=[0, 1], sampler={"cfg": 0.5})
    assert changed.points == {}  # other sampler settings: earlier points do not apply


class StepFamily(LineFamily):
    """Like LineFamily, plus a `steps` sampler argument that shifts the image by 10·steps."""
    SAMPLER_ARGS = LineFamily.SAMPLER_ARGS + (Arg("steps", int, 0, "adds 10·steps to every pixel"),)

    def sample(self, bundle, seeds, labels, cfg=0.0, steps=0, **_):
        return super().sample(bundle, seeds, labels, cfg=cfg + 10 * steps)


def test_a_grid_argument_gets_its_own_best_per_setting(tmp_path):
    bundle = Bundle(net=OneWeight())
    cfg = SweepConfig(num_images=4, batch=2, w=[0, 0.5, 1, 1.5, 2], grid={"steps": [0, 1]}, search="grid")
    sweep = neon_sweep(StepFamily(), bundle, {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)}, cfg,
                  lambda: DistanceTo(115), None)
    best = sweep.run()
    # steps=0: value 100 + 10w, best w = 1.5 (FID 0); steps=1: 110 + 10w, best w = 0.5 (FID 0)
    assert {(p["setting"]["steps"], p["w"]) for p in sweep.points.values() if p["fid"] == 0} == {(0, 1.5), (1, 0.5)}
    assert sweep.best({"steps": 0})["w"] == 1.5 and sweep.best({"steps": 1})["w"] == 0.5
    assert best["fid"] == 0 and len(sweep.points) == 10
