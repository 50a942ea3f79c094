"""The study's pieces: the EDM model it trains (EDMFamily.build), its config schema, the paired summary, the
feature classifier, the evaluation seeds, and the stage cache's safety."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from experiments.fashion_mnist.classifier import FeatureCNN, predict, train_classifier
from experiments.fashion_mnist.config import parse_study
from experiments.fashion_mnist.evaluate import best_row, image_set_metrics, reference_statistics, summarize_arm
from experiments.fashion_mnist.pipeline import StudyRecord, evaluation_blocks
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
    assert full.evaluation.seeds >= 3 and min(full.sweep.diverse) < 0
    assert max(full.sweep.ode) == 2.0
    assert smoke.synthetic.num_images < full.synthetic.num_images   # the smoke overrides are merged


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["study"]["evaluation"].update(sed=1), "study.evaluation.sed: unknown field"),
    (lambda d: d["study"]["evaluation"].update(seeds=1), "study.evaluation.seeds"),
    (lambda d: d["study"]["selftrain"].update(lr="fast"), "study.selftrain.lr: expected a number"),
    (lambda d: d["study"].update(threads=0), "study.threads"),
    (lambda d: d.pop("study"), "study"),
])
def test_bad_configs_are_refused_naming_the_field(edit, message):
    data = yaml.safe_load(yaml.safe_dump(CONFIG))
    edit(data)
    with pytest.raises(ConfigError, match=message):
        parse_study(data)


# -- the paired summary ---------------------------------------------------------------------------------

def blocks(values, pixel=None):
    pixel = pixel or [0.0] * len(values)
    return [{"classifier_fd": v, "pixel_fd": p} for v, p in zip(values, pixel)]


def test_paired_difference_is_taken_seed_by_seed():
    base = blocks([2.0, 3.0, 4.0])
    rows = summarize_arm({1.0: blocks([1.5, 2.6, 3.4])}, base)
    assert [r["w"] for r in rows] == [0.0, 1.0]
    r = rows[1]
    assert r["classifier_fd"]["mean"] == pytest.approx(2.5)
    assert r["classifier_fd"]["std"] == pytest.approx(np.std([1.5, 2.6, 3.4], ddof=1))
    assert r["classifier_fd_diff"]["mean"] == pytest.approx(-0.5)     # diffs -0.5, -0.4, -0.6
    assert r["classifier_fd_diff"]["std"] == pytest.approx(0.1)       # far smaller than the unpaired std
    best = best_row(rows)
    assert best["w"] == 1.0 and best["improvement"] == pytest.approx(0.5) and best["ratio"] == pytest.approx(5.0)


def test_no_improvement_when_w0_is_best():
    rows = summarize_arm({1.0: blocks([2.5, 3.5, 4.5]), -1.0: blocks([3.0, 3.1, 4.2])}, blocks([2.0, 3.0, 4.0]))
    assert [r["w"] for r in rows] == [-1.0, 0.0, 1.0]
    assert best_row(rows)["w"] == 0.0 and best_row(rows)["ratio"] == 0.0


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

def test_evaluation_seeds_are_disjoint_ranges_with_balanced_labels(family):
    cfg = parse_study(CONFIG).study
    bundle = family.build(seed=0, resolution=8, img_channels=1, num_classes=10, **SMALL)
    seen = []
    for seeds, labels in evaluation_blocks(family, bundle, cfg):
        n = cfg.evaluation.per_class * 10
        assert len(seeds) == n and seeds == list(range(seeds[0], seeds[0] + n))
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, cfg.evaluation.per_class))
        seen += seeds
    assert len(seen) == len(set(seen)) == cfg.evaluation.seeds * cfg.evaluation.per_class * 10


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
