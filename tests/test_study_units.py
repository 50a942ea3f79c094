"""The study's pieces: the EDM model it trains (EDMFamily.build), its config schema, the paired summary, the
feature classifier, the evaluation seeds, and the stage cache's safety."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments.fashion_mnist.classifier import FeatureCNN, predict, train_classifier
from experiments.fashion_mnist.config import GUIDE_ARM, parse_study
from experiments.fashion_mnist.evaluate import (
    choose,
    image_set_metrics,
    improvement,
    paired_row,
    reference_statistics,
    sweep_rows,
)
from experiments.fashion_mnist.pipeline import StudyRecord, evaluation_ranges
from experiments.fashion_mnist.protocol import (
    merge_point,
    neon_guided_points,
    neon_w,
    report_points,
    summarize,
    unconditional_points,
)
from neon.config import ConfigError
from neon.errors import NeonError
from neon.family import get_family

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "configs" / "fashion_mnist_16.yaml").read_text())
SMALL = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="module")
def family():
    return get_family("edm")


# -- the model ------------------------------------------------------------------------------------------

def test_build_is_seeded_and_uses_the_official_initialisation(family):
    a = family.build(seed=0, resolution=8, img_channels=1, num_classes=10, **SMALL)
    b = family.build(seed=0, resolution=8, img_channels=1, num_classes=10, **SMALL)
    c = family.build(seed=1, resolution=8, img_channels=1, num_classes=10, **SMALL)
    sa, sb, sc = (x.net.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # EDM initialises the output convolution near zero (init_weight 1e-5), unlike tiny()'s random weights.
    assert sa["model.dec.8x8_aux_conv.weight"].abs().max() < 1e-3
    assert a.num_classes == 10 and a.resolution == 8 and a.net.img_channels == 1


def test_built_model_samples_encodes_trains_and_round_trips(family, tmp_path):
    bundle = family.build(seed=0, resolution=8, img_channels=1, num_classes=10, **SMALL)
    labels = torch.tensor([0, 3, 9])
    images = family.sample(bundle, [5, 6, 7], labels, num_steps=3)
    assert images.dtype == torch.uint8 and images.shape == (3, 8, 8, 1)
    batch = family.encode(bundle, images, labels)
    assert batch["images"].shape == (3, 1, 8, 8)
    bundle.net.train()
    loss = family.loss(bundle, batch)
    assert torch.isfinite(loss)
    loss.backward()
    bundle.net.eval()
    path = str(tmp_path / "net.pth")
    family.save(bundle, path)
    again = family.load(path)
    assert again.info["augment_kwargs"] is None and again.net.img_channels == 1
    state = bundle.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.net.state_dict().items())
    assert torch.equal(family.sample(again, [5, 6, 7], labels, num_steps=3), images)


def test_build_refuses_unknown_arguments(family):
    with pytest.raises(NeonError, match=r"edm build\.model_chanels: unknown argument .*model_channels"):
        family.build(model_chanels=8)


# -- the config -----------------------------------------------------------------------------------------

def test_repository_config_and_its_smoke_variant_validate():
    full, smoke = parse_study(CONFIG).study, parse_study(CONFIG, smoke=True).study
    assert full.synthetic.num_images == 2000 and full.synthetic.sampler["num_steps"] == 18
    assert full.synthetic.sampler.get("S_churn", 0) == 0            # S: the deterministic Heun sampler
    assert full.synthetic.diverse_sampler["S_noise"] > 1            # the diversity-seeking one
    assert full.evaluation.repeats >= 3 and min(full.sweep.diverse) < 0
    assert 0.0 in smoke.sweep.guided                                 # the smoke run checks ω = 0 against θr
    assert max(full.sweep.ode) == 2.0
    assert smoke.synthetic.num_images < full.synthetic.num_images   # the smoke overrides are merged


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["study"]["evaluation"].update(sed=1), "study.evaluation.sed: unknown field"),
    (lambda d: d["study"]["evaluation"].update(repeats=1), "study.evaluation.repeats"),
    (lambda d: d["study"]["sweep"].update(guided=[]), "study.sweep.guided"),
    (lambda d: d["study"]["selftrain"].update(lr="fast"), "study.selftrain.lr: expected a number"),
    (lambda d: d["study"].update(threads=0), "study.threads"),
    (lambda d: d.pop("study"), "study"),
])
def test_bad_configs_are_refused_naming_the_field(edit, message):
    data = yaml.safe_load(yaml.safe_dump(CONFIG))
    edit(data)
    with pytest.raises(ConfigError, match=message):
        parse_study(data)


# -- the paired summary and the choice on the validation range -----------------------------------------

def metrics(*classifier_fd, pixel=0.0):
    """Metrics of one range (one value) or of several report ranges (a list)."""
    out = [{"classifier_fd": v, "pixel_fd": pixel} for v in classifier_fd]
    return out[0] if len(out) == 1 else out


def test_paired_difference_is_taken_range_by_range():
    row = paired_row(metrics(1.5, 2.6, 3.4), metrics(2.0, 3.0, 4.0))
    assert row["classifier_fd"]["mean"] == pytest.approx(2.5)
    assert row["classifier_fd"]["std"] == pytest.approx(np.std([1.5, 2.6, 3.4], ddof=1))
    assert row["classifier_fd_diff"]["mean"] == pytest.approx(-0.5)     # diffs -0.5, -0.4, -0.6
    assert row["classifier_fd_diff"]["std"] == pytest.approx(0.1)       # far smaller than the unpaired std
    gain = improvement(row)
    assert gain["improvement"] == pytest.approx(0.5) and gain["ratio"] == pytest.approx(5.0)


def test_grid_rows_hold_the_validation_fd_and_its_difference_to_theta_r():
    rows = sweep_rows({1.0: metrics(2.5), -1.0: metrics(3.5)}, metrics(3.0))
    assert [r["w"] for r in rows] == [-1.0, 0.0, 1.0]
    assert [r["classifier_fd_diff"] for r in rows] == [0.5, 0.0, -0.5]


def test_choice_is_the_lowest_validation_fd():
    rows = sweep_rows({1.0: metrics(2.0), 2.0: metrics(2.5)}, metrics(3.0))
    assert choose(rows) == 1.0
    rows = sweep_rows({1.0: metrics(3.5), -1.0: metrics(3.2)}, metrics(3.0))
    assert choose(rows) == 0.0                                         # θr itself when nothing beats it


def test_choice_ignores_the_report_ranges():
    """ode w = 1 is best on the validation range, w = 2 on the report ranges: the validation range decides what is
    reported, and w = 2 is not even measured on the report ranges."""
    cfg = parse_study(CONFIG).study
    cfg.sweep.ode, cfg.sweep.control, cfg.sweep.diverse = [1.0, 2.0], [1.0], [-1.0]
    cfg.sweep.guided, cfg.sweep.neon_guided = [1.0], [1.0]
    points = unconditional_points(cfg) + neon_guided_points(cfg, 1.0)
    validation = {p.name: metrics(3.0) for p in points}
    validation.update(ode_w1=metrics(2.0), ode_w2=metrics(2.5))
    assert neon_w(validation, cfg) == 1.0
    measured = [p.name for p in report_points(validation, cfg)]
    assert "ode_w1" in measured and "ode_w2" not in measured
    report = {p.name: metrics(3.0, 3.0, 3.0) for p in points}
    report.update(ode_w1=metrics(2.8, 2.9, 2.7), ode_w2=metrics(1.0, 1.1, 0.9))
    summary = summarize(validation, report, cfg)
    chosen = summary["arms"]["ode"]["chosen"]
    assert chosen["w"] == 1.0 and chosen["point"] == "ode_w1"
    assert chosen["classifier_fd"]["mean"] == pytest.approx(2.8) and chosen["improvement"] == pytest.approx(0.2)
    assert summary["comparison"][1]["point"] == "ode_w1"


def test_a_guided_grid_starts_from_its_unguided_model():
    base, neon = metrics(3.0), metrics(2.0)
    rows = sweep_rows({0.5: metrics(1.9)}, base, "omega", zero=neon)
    assert [r["omega"] for r in rows] == [0.0, 0.5]
    assert rows[0]["classifier_fd"] == 2.0 and rows[0]["classifier_fd_diff"] == -1.0   # ω = 0: θneon; Δ to θr


# -- what is evaluated -----------------------------------------------------------------------------------

def test_the_protocol_evaluates_every_grid_point_and_both_continued_fine_tuning_baselines():
    cfg = parse_study(CONFIG).study
    names = [p.name for p in unconditional_points(cfg)]
    assert len(names) == len(set(names)) and names[0] == "base_w0"
    for arm in ("ode", "control", "diverse"):
        assert {merge_point(arm, w).name for w in getattr(cfg.sweep, arm)} <= set(names)
    assert {"control_w-1", "ode_w-1"} <= set(names)                    # the fine-tuned θ of each, as it is
    guided = [p for p in unconditional_points(cfg) if p.guided]
    assert [p.omega for p in guided] == cfg.sweep.guided and all(p.arm == "base" for p in guided)
    neon = neon_guided_points(cfg, 1.5)
    assert [p.omega for p in neon] == cfg.sweep.neon_guided
    assert all(p.arm == GUIDE_ARM and p.w == 1.5 and p.guided for p in neon)


# -- the classifier and the metrics ---------------------------------------------------------------------

def square_images(n, seed=0):
    """uint8 (n, 16, 16, 1): a bright square at a class-dependent place, on noise; labels i mod 10."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 16, 16, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 6 * (c // 5), 1 + 3 * (c % 5)
        images[i, r:r + 5, col:col + 3] = 230
    return images, labels


def test_classifier_learns_and_gives_4_width_features():
    images, labels = square_images(400)
    net = train_classifier(images, labels, width=4, epochs=4, batch=50, lr=1e-2, seed=0, log=lambda *_: None)
    test, test_labels = square_images(200, seed=1)
    feats, probs = predict(net, test)
    assert isinstance(net, FeatureCNN) and feats.shape == (200, 16) and feats.dtype == np.float64
    assert (probs.argmax(1) == test_labels).mean() > 0.5                 # far above chance (0.1)


def test_fd_of_the_reference_set_to_itself_is_zero():
    images, labels = square_images(300)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = FeatureCNN(width=4).eval()
    ref = reference_statistics(net, images)
    m = image_set_metrics(net, images, ref, labels)
    assert m["classifier_fd"] == pytest.approx(0, abs=1e-8) and m["pixel_fd"] == pytest.approx(0, abs=1e-8)
    other = image_set_metrics(net, square_images(300, seed=5)[0][::-1].copy(), ref)
    assert other["pixel_fd"] > 0


# -- evaluation seeds and the stage cache ---------------------------------------------------------------

def test_validation_and_report_ranges_are_disjoint_with_balanced_labels(family):
    cfg = parse_study(CONFIG).study
    bundle = family.build(seed=0, resolution=8, img_channels=1, num_classes=10, **SMALL)
    ranges = evaluation_ranges(family, bundle, cfg)
    names = [name for name, _, _ in ranges]
    assert names == ["validation"] + [f"report {b + 1}" for b in range(cfg.evaluation.repeats)]
    seen = []
    for _, seeds, labels in ranges:
        n = cfg.evaluation.per_class * 10
        assert len(seeds) == n and seeds == list(range(seeds[0], seeds[0] + n))
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, cfg.evaluation.per_class))
        seen += seeds
    assert len(seen) == len(set(seen)) == (cfg.evaluation.repeats + 1) * cfg.evaluation.per_class * 10


def test_a_validation_range_overlapping_a_report_range_is_refused(family):
    data = yaml.safe_load(yaml.safe_dump(CONFIG))
    data["study"]["evaluation"]["validation_offset"] = data["study"]["evaluation"]["per_class"] * 10 - 1
    with pytest.raises(ConfigError, match="study.evaluation.validation_offset: .* overlap the report ranges"):
        parse_study(data)
    data["study"]["evaluation"]["validation_offset"] = 100_000          # elsewhere: accepted
    cfg = parse_study(data).study
    bundle = family.build(seed=0, resolution=8, img_channels=1, num_classes=10, **SMALL)
    assert evaluation_ranges(family, bundle, cfg)[0][1][0] == 100_000


def test_stage_folders_not_made_by_the_study_are_never_deleted(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    rec = StudyRecord(str(tmp_path), {}, smoke=True)
    with pytest.raises(NeonError, match="not written by this study"):
        rec.begin("data", "abc")
    assert (tmp_path / "data" / "precious.txt").exists()


def test_a_stage_with_new_settings_starts_from_an_empty_folder(tmp_path):
    rec = StudyRecord(str(tmp_path), {}, smoke=True)
    folder, done = rec.begin("base", "key1")
    Path(folder, "old.pth").write_text("x")
    rec.record("base", "key1", {"seconds": 1})
    assert rec.begin("base", "key1")[1] is not None                     # same key: finished, cached
    folder, done = rec.begin("base", "key2")
    assert done is None and not Path(folder, "old.pth").exists()
