"""FD_DINOv2: our DINOv2 detector equals EDM2's (official DINOv2 network, EDM2 preprocessing) on the recorded
tiny model; the released ViT-L/14 layout loads strictly; statistics and FD go through the CLI and FIDMetric.

Fixtures: tests/fixtures/dinov2 (README there). Every size comes from the files: the images and features from
io.pt, the head count (not stored in a state dict) from config.json, the release layout from the manifest.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import fixtures_root
from neon.checkpoint import load_strict
from neon.cli import main as neon_main
from neon.config import ConfigError, parse_config
from neon.errors import NeonError
from neon.evaluate import FIDMetric
from neon.metrics import FeatureExtractor, gaussian_from_features, load_stats, save_stats, to_nchw_uint8
from neon.metrics.dinov2 import DinoV2, DINOv2Detector, architecture, load_dinov2, to_timm_keys
from neon.metrics.testing import random_images


def dinov2_dir():
    return fixtures_root() / "dinov2"


# A fixture set from before the DINOv2 detector (NEON_FIXTURES pointing at it) has no dinov2/ folder: its
# recorded outputs are not there to compare with. The repository's own set always has it (test_fixtures_travel).
if os.environ.get("NEON_FIXTURES") and not dinov2_dir().is_dir():
    pytest.skip(f"{dinov2_dir()}: this fixture set records no DINOv2 outputs", allow_module_level=True)


def _config() -> dict:
    return json.loads((dinov2_dir() / "config.json").read_text())


def _cases() -> list[tuple[str, str]]:
    """(case, resize mode) for every recorded output in io.pt."""
    path = dinov2_dir() / "io.pt"
    if not path.is_file():
        return []
    keys = torch.load(path, weights_only=True).keys()
    return sorted((k.split(".")[0], k.rsplit("_", 1)[1]) for k in keys if ".features_" in k)


@pytest.fixture(scope="module")
def io():
    return torch.load(dinov2_dir() / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def weights():
    return str(dinov2_dir() / _config()["weights"])


@pytest.fixture(scope="module")
def net(weights):
    return load_dinov2(weights, num_heads=_config()["build_kwargs"]["num_heads"])


def test_fixture_records_every_resize_mode_and_a_grey_image(io):
    cases = _cases()
    assert {mode for _, mode in cases} == set(_config()["resize_modes"])
    assert any(io[f"{case}.images"].shape[1] == 1 for case, _ in cases)


@pytest.mark.parametrize("case, mode", _cases())
def test_features_equal_edm2_detector_with_official_dinov2(net, io, case, mode):
    images, expected = io[f"{case}.images"], io[f"{case}.features_{mode}"]   # uint8 NCHW, (B, D) float32
    with torch.inference_mode():
        ours = DINOv2Detector(net, resize_mode=mode)(to_nchw_uint8(images))
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_timm_size_based_position_resampling_would_not_match(net, io, monkeypatch):
    """Why DinoV2 interpolates its own position embeddings: timm's resampling (output size instead of DINOv2's
    scale factor (h + 0.1) / M) moves the features well beyond the tolerance above."""
    from timm.layers import resample_abs_pos_embed

    case, mode = next((c, m) for c, m in _cases() if m == "torch")
    grid = net.vit.patch_embed.grid_size
    monkeypatch.setattr(net, "interpolate_pos_embed", lambda h, w: resample_abs_pos_embed(
        net.vit.pos_embed, new_size=(h, w), old_size=grid, num_prefix_tokens=1))
    with torch.inference_mode():
        ours = DINOv2Detector(net, resize_mode=mode)(to_nchw_uint8(io[f"{case}.images"]))
    assert (ours - io[f"{case}.features_{mode}"]).abs().max() > 1e-2


def test_batches_and_layouts_give_the_same_features(weights, io):
    case = max((c for c, _ in _cases()), key=lambda c: io[f"{c}.images"].shape[0])
    nchw = io[f"{case}.images"]
    whole = FeatureExtractor("dinov2", weights, device="cpu")
    one_by_one = FeatureExtractor("dinov2", weights, device="cpu", max_batch=1)
    ref = whole(nchw)["pool"]
    assert ref.shape == (nchw.shape[0], whole.dim) and not whole.logits
    torch.testing.assert_close(one_by_one(nchw.permute(0, 2, 3, 1).numpy())["pool"], ref, rtol=1e-5, atol=1e-5)


def _meta_state(manifest: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in
            manifest["state_dict"]}


def test_release_layout_strict_loads_on_meta():
    manifest = json.loads((dinov2_dir() / "manifest_dinov2_vitl14.json").read_text())
    state = _meta_state(manifest)
    kwargs = architecture(state)          # the release's head count follows the 64-wide-head rule
    built = manifest["build_kwargs"]
    for key in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "mlp_ratio"):
        assert kwargs[key] == built[key], key
    net = load_strict(lambda: DinoV2(**kwargs), to_timm_keys(state), manifest["file"])
    assert DINOv2Detector(net).dim == built["embed_dim"]


def _save_variant(path, weights, edit) -> str:
    state = torch.load(weights, weights_only=True)   # the fixture's plain tensors, edited and saved again
    edit(state)
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.ls2.gamma"), "1 missing"),
    (lambda s: s.update(extra=torch.zeros(3)), "1 unexpected"),
    (lambda s: s.update({"norm.weight": torch.zeros(7)}), "shape mismatch"),
    (lambda s: s.pop("cls_token"), "not a DINOv2 ViT state dict"),
    (lambda s: s.update(pos_embed=s["pos_embed"][:, :-1]), "not a square grid"),
])
def test_mismatched_weights_are_one_line_naming_the_file(weights, tmp_path, edit, message):
    path = _save_variant(tmp_path / "bad.pth", weights, edit)
    with pytest.raises(NeonError, match=message) as info:
        load_dinov2(path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_missing_or_foreign_weights_files_are_one_line(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path in (tmp_path / "absent.pth", garbage):
        with pytest.raises(NeonError) as info:
            load_dinov2(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(NeonError, match="needs its weights"):
        FeatureExtractor("dinov2", None, device="cpu")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran",))


def test_weights_with_code_are_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"cls_token": _RunsCode()}, tmp_path / "evil.pth", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(NeonError):
        load_dinov2(tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()


def test_cli_stats_round_trip_and_fd_of_a_set_with_itself_is_zero(weights, tmp_path, capsys):
    images = random_images(5, 40, 36, seed=3).numpy()                  # uint8 NHWC
    np.savez(tmp_path / "set.npz", images)
    common = ["--detector", "dinov2", "--detector-weights", weights, "--batch", "2", "--quiet"]
    neon_main(["stats", "--images", str(tmp_path / "set.npz"), "--out", str(tmp_path / "ref.npz"), *common])
    with torch.inference_mode():
        feats = DINOv2Detector(load_dinov2(weights))(to_nchw_uint8(images))
    mu, sigma = gaussian_from_features(feats)
    stats = load_stats(tmp_path / "ref.npz", dim=feats.shape[1])
    assert stats.count == len(images)
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-6)

    neon_main(["fid", "--images", str(tmp_path / "set.npz"), "--ref", str(tmp_path / "ref.npz"),
               "--json", str(tmp_path / "out.json"), *common])
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["detector"] == "dinov2" and result["num_images"] == len(images)
    assert abs(result["fid"]) < 1e-6 * np.trace(sigma)
    assert "FD_DINOv2" in capsys.readouterr().out


def test_cli_refuses_inception_score_with_dinov2(weights, tmp_path, capsys):
    save_stats(tmp_path / "ref.npz", np.zeros(4), np.eye(4))
    with pytest.raises(SystemExit):
        neon_main(["fid", "--images", str(tmp_path / "x.npz"), "--ref", str(tmp_path / "ref.npz"), "--is",
                   "--detector", "dinov2", "--detector-weights", weights])
    err = capsys.readouterr().err.strip()
    assert "Inception Score" in err and "\n" not in err


def test_fid_metric_measures_fd_dinov2_and_checks_the_dimension(weights, tmp_path):
    images = random_images(4, 32, 32, seed=4)
    extractor = FeatureExtractor("dinov2", weights, device="cpu")
    mu, sigma = gaussian_from_features(extractor(images)["pool"])
    save_stats(tmp_path / "ref.npz", mu, sigma, count=len(images))
    metric = FIDMetric("dinov2", str(tmp_path / "ref.npz"), "cpu", weights)
    acc = metric()
    acc.update(images, list(range(len(images))))
    assert abs(acc.finish()["fid"]) < 1e-6 * np.trace(sigma)

    save_stats(tmp_path / "inception.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(NeonError, match=f"2048-d, the dinov2 detector gives {extractor.dim}-d"):
        FIDMetric("dinov2", str(tmp_path / "inception.npz"), "cpu", weights)


def test_a_run_asking_for_the_inception_score_gets_none_from_dinov2(weights, tmp_path):
    images = random_images(4, 32, 32, seed=5)
    mu, sigma = gaussian_from_features(FeatureExtractor("dinov2", weights, device="cpu")(images)["pool"])
    save_stats(tmp_path / "ref.npz", mu, sigma, count=len(images))
    acc = FIDMetric("dinov2", str(tmp_path / "ref.npz"), "cpu", weights, inception_score=True)()
    acc.update(images, list(range(len(images))))
    result = acc.finish()
    assert result["fid"] is not None and "is_mean" not in result and "is_unavailable" not in result


def test_run_config_accepts_the_dinov2_detector():
    base = {"family": "edm", "synthetic": {"num_images": 4}}
    assert parse_config({**base, "metrics": {"detector": "dinov2"}}).metrics.detector == "dinov2"
    with pytest.raises(ConfigError, match="metrics.detector"):
        parse_config({**base, "metrics": {"detector": "dino"}})
