"""Precision and recall vs w (the paper's Fig. 4) and any recorded metric vs w, drawn from sweep points; the sweep
draws them next to sweep.json when its points hold them."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_core_sweep import LineFamily, OneWeight  # images filled with 100 + 10·p (θneon(w): 100 + 10·w)

from neon.config import SweepConfig
from neon.family import Bundle
from neon.plot_metrics import _curves, plot_metric_vs_w, plot_precision_recall
from neon.sweep import neon_sweep


def fig4_points(cfgs=(None,)):
    """Points shaped like the paper's Fig. 4: precision falls with w, recall rises then falls."""
    return [{"w": w, "cfg": c, "setting": {}, "fid": 5 - w, "num_images": 100,
             "precision": 0.8 - 0.1 * w, "recall": 0.5 + 0.2 * w - 0.1 * w * w, "kid_mean": 0.01 / (1 + w)}
            for c in cfgs for w in (1.5, 0.0, 0.5, 1.0, 2.0)]


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_precision_recall_vs_w_is_one_curve_per_guidance_scale(tmp_path):
    points = fig4_points(cfgs=(1.0, 1.5))
    assert plot_precision_recall(points, str(tmp_path / "pr.png"), cfg_key="cfg_scale")
    width, height = png_size(tmp_path / "pr.png")
    assert width > height > 0  # two panels side by side
    curves = _curves(points, "precision", "cfg_scale")
    assert [label for label, _ in curves] == ["cfg_scale=1", "cfg_scale=1.5"]
    assert all([p["w"] for p in pts] == [0.0, 0.5, 1.0, 1.5, 2.0] for _, pts in curves)


def test_metric_vs_w_draws_any_recorded_key(tmp_path):
    assert plot_metric_vs_w(fig4_points(), "kid_mean", str(tmp_path / "kid.png"), "KID")
    assert png_size(tmp_path / "kid.png")[0] > 0


def test_nothing_is_written_when_no_point_recorded_the_metric(tmp_path):
    points = [{k: v for k, v in p.items() if k not in ("precision", "recall", "kid_mean")} for p in fig4_points()]
    assert not plot_precision_recall(points, str(tmp_path / "pr.png"))
    assert not plot_metric_vs_w(points, "kid_mean", str(tmp_path / "kid.png"))
    assert list(tmp_path.iterdir()) == []


class Fig4Metric:
    """An accumulator recording FID-, precision- and recall-like numbers that move with the image value."""

    def __init__(self, with_pr):
        self.values, self.with_pr = [], with_pr

    def update(self, images, seeds, labels=None):
        self.values.append(images.float().mean().item())

    def finish(self):
        w = (float(np.mean(self.values)) - 100) / 10
        return {"fid": abs(w - 1)} | ({"precision": 0.8 - 0.1 * w, "recall": 0.5 + 0.1 * w} if self.with_pr else {})


@pytest.mark.parametrize("with_pr", [True, False])
def test_the_sweep_draws_precision_recall_next_to_sweep_json_when_recorded(tmp_path, with_pr):
    sweep = neon_sweep(LineFamily(), Bundle(net=OneWeight()), {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)},
                  SweepConfig(w=[0.0, 1.0, 2.0], num_images=2, batch=2, search="grid"), lambda: Fig4Metric(with_pr),
                  str(tmp_path / "sweep.json"))
    sweep.run()
    assert (tmp_path / "sweep.png").is_file()
    assert (tmp_path / "sweep_precision_recall.png").is_file() == with_pr
    assert not (tmp_path / "sweep_kid.png").exists()
