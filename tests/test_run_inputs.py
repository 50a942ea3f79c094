"""Every file a run reads is checked before its first stage: the detector's weights too, and torch-fidelity's own
weights (when a config names none) are fetched then, not after sampling and self-training."""
import pytest
import torch

from neon.config import parse_config
from neon.errors import NeonError
from neon.run import check_run_inputs
from neon.testing import TinyPixFamily


def _config(tmp_path, **metrics) -> dict:
    base = tmp_path / "base.pth"
    family = TinyPixFamily()
    family.save(family.tiny(), str(base))
    return {"family": "tinypix", "base": str(base), "synthetic": {"num_images": 4},
            "metrics": {"detector": "inception-v3-compat", "inception_score": False, **metrics}}


def test_a_missing_detector_weights_file_is_refused_before_the_run_folder_exists(tmp_path):
    cfg = parse_config(_config(tmp_path, weights=str(tmp_path / "inception.pth")))
    with pytest.raises(NeonError, match=r"^metrics.weights: detector weights file .*inception.pth not found"):
        check_run_inputs(cfg, False, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unset_inception_weights_are_fetched_before_the_first_stage_or_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    fetched = []

    def offline(url, dst, progress=True):
        fetched.append(url)
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = parse_config(_config(tmp_path))
    with pytest.raises(NeonError, match=r"^metrics.weights: not set, and torch-fidelity's Inception weights could "
                                        r"not be fetched \(OSError\)") as e:
        check_run_inputs(cfg, False, str(tmp_path / "run"))
    assert "\n" not in str(e.value) and fetched[0].endswith("weights-inception-2015-12-05-6726825d.pth")
    assert not (tmp_path / "run").exists() and not list((tmp_path / "hub").rglob("*.pth"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, progress=True: open(dst, "wb").close())
    check_run_inputs(cfg, False, str(tmp_path / "run"))   # fetched now: the run goes on
    assert (tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").is_file()
