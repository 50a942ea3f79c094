"""What `neon run` prints at the end: numbers that round to zero read as 0, and a run whose sweep chose w = 0
says plainly that θneon is θr (and, in a smoke run, why)."""
from neon.config import format_metric, parse_config
from neon.run import summarize


def test_values_that_round_to_zero_print_as_zero_never_as_signed_zeros():
    assert format_metric("fid", -0.00001) == "0" and format_metric("fid", 0.00004, sign=True) == "0"
    assert format_metric("fid", 1.23456) == "1.2346" and format_metric("fid", -0.5, sign=True) == "-0.5000"
    assert format_metric("kid_mean", 0.0000004) == "0" and format_metric("kid_mean", 0.000012) == "0.000012"


def _doc(w: float, smoke: bool) -> dict:
    point = {"w": w, "cfg": None, "setting": {}, "fid": -0.00002, "num_images": 4}
    final = {**point, "seeds": [100, 103]}
    return {"smoke": smoke, "config": {"sweep": {"objective": "fid"}},
            "stages": {"sweep": {"best": {**point, "snapshot": "s.pth"},
                                 "snapshots": [{"snapshot": "s.pth", "best": point, "final": final}]},
                       "final": {"snapshot": "s.pth", "neon": final, "base": {**final, "w": 0.0},
                                 "delta": {"fid": {"mean": 0.0, "std": None, "per_range": [0.0]}}}}}


def test_a_smoke_run_that_chose_w_zero_says_theta_neon_is_theta_r_and_why(capsys):
    cfg = parse_config({"family": "tinypix", "synthetic": {"num_images": 4}}, smoke=True)
    summarize(_doc(0.0, smoke=True), cfg)
    out = capsys.readouterr().out
    assert "-0.0000" not in out and "+0.0000" not in out and "FID 0 on 4 images" in out
    assert "θneon = θr: w = 0 won the sweep, so Neon changed nothing (expected in a smoke run" in out


def test_a_run_that_chose_another_w_does_not_claim_theta_neon_is_theta_r(capsys):
    cfg = parse_config({"family": "tinypix", "synthetic": {"num_images": 4}}, smoke=True)
    summarize(_doc(0.5, smoke=False), cfg)
    assert "θneon = θr" not in capsys.readouterr().out


def test_one_swept_snapshot_is_drawn_as_its_objective_against_w(tmp_path):
    import json

    from neon.snapshot_sweep import plot_snapshots
    points = [{"w": w, "cfg": None, "setting": {}, "fid": (w - 0.5) ** 2 + 1, "num_images": 4} for w in (0, 0.5, 1)]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "snapshot-0000000016.json").write_text(json.dumps({"points": points}))
    entry = {"snapshot": "snapshot-0000000016.pth", "images": 16, "best": points[1],
             "final": {**points[1], "num_images": 8}}
    plot_snapshots([entry], str(tmp_path), str(tmp_path / "sweep.png"))
    from PIL import Image
    width, height = Image.open(tmp_path / "sweep.png").size
    assert width < 1.6 * height   # one panel (objective vs w), not the two-panel heat map of several snapshots
