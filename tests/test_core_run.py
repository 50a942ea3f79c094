"""`neon run`: the stages in order, recorded in run.json, each skipped on a rerun once its output exists; every
self-training snapshot swept, θr at its own sampler settings, final seeds apart from the sweep's."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from neon.config import ConfigError, parse_config, snapshot_images
from neon.errors import NeonError
from neon.snapshot_sweep import select_snapshots

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

CONFIG = {
    "family": "tinypix",
    "description": "a tiny end-to-end run",
    "load_args": {"num_classes": 3},
    "metrics": {"detector": "inception-v3-compat", "weights": "fid-helper", "inception_score": False},
    "synthetic": {"num_images": 12, "labels": "per_class", "batch": 6, "sampler": {"num_steps": 3}},
    "finetune": {"lr": 1e-3, "batch": 4, "total_images": 24, "snapshot_every_images": 12, "log_every_images": 4,
                 "ema": {"beta": 0.5}},
    "sweep": {"w": [0.0, 1.0, 2.0], "num_images": 6, "batch": 6, "seed_offset": 100, "refine": 0.5,
              "snapshot": "all"},
    "final": {"num_images": 9, "batch": 6, "seed_offset": 1000, "base_sampler": {"num_steps": 2}},
}


def _run(config_path, out):
    return subprocess.run([sys.executable, "-m", "neon", "run", str(config_path), "--smoke", "--out", str(out)],
                          env=ENV, capture_output=True, text=True)


def _run_config(config: dict, folder, out: str = "r", name: str = "c.yaml"):
    """Write `config` to folder/name and `neon run` it (--smoke) into folder/out -> the process result."""
    (folder / name).write_text(yaml.safe_dump(config))
    return _run(folder / name, folder / out)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of CONFIG: (its folder, the config file, the process result)."""
    root = tmp_path_factory.mktemp("full")
    res = _run_config(CONFIG, root, "run", "tiny.yaml")
    assert res.returncode == 0, res.stderr[-2000:]
    return root / "run", root / "tiny.yaml", res


def _without_seconds(doc):
    if isinstance(doc, dict):
        return {k: _without_seconds(v) for k, v in doc.items() if k != "seconds"}
    if isinstance(doc, list):
        return [_without_seconds(v) for v in doc]
    return doc


def _read(path, moved=None):
    """A JSON file, with the folder it was written in (`moved`: (from, to)) named as the original one."""
    text = path.read_text()
    return json.loads(text.replace(*map(str, moved)) if moved else text)


def test_run_records_every_stage_and_a_rerun_skips_them(full_run):
    out, config, first = full_run
    doc = json.loads((out / "run.json").read_text())
    assert list(doc["stages"]) == ["sample", "finetune", "sweep", "final"]
    assert doc["config"]["family"] == "tinypix" and doc["versions"]["torch"].startswith("2.14.1")
    assert len(doc["stages"]["finetune"]["snapshots"]) == 2
    sweep = json.loads((out / "sweep.json").read_text())
    best = sweep["best"]["w"]
    grid = [p for p in sweep["points"] if p["w"] in (0.0, 1.0, 2.0)]
    grid_best = min(grid, key=lambda p: p["fid"])["w"]
    assert {p["w"] for p in sweep["points"]} == {0.0, 1.0, 2.0, grid_best - 0.5, grid_best + 0.5}  # grid, ± refine
    final = doc["stages"]["final"]
    assert final["neon"]["w"] == best and final["base"]["w"] == 0 and final["neon"]["num_images"] == 9
    assert "base:" in first.stdout and "neon:" in first.stdout and "best snapshot:" in first.stdout
    begun = [line.split(":")[0] for line in first.stdout.splitlines() if line.startswith("stage ")]
    assert begun == [f"stage {k} of 4" for k in (1, 2, 3, 4)]   # each stage says where the run stands

    again = _run(config, out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sampling" not in again.stderr and "self-training" not in again.stderr and "w=" not in again.stderr
    assert json.loads((out / "run.json").read_text())["stages"] == doc["stages"]
    assert "stage " not in again.stdout   # every stage reused: none begins


def test_every_snapshot_is_swept_and_the_best_final_fid_chooses_theta_s(full_run):
    out, _, _ = full_run
    doc = json.loads((out / "run.json").read_text())
    written = doc["stages"]["finetune"]["snapshots"]
    cfg = parse_config(CONFIG, smoke=True)
    assert [int(os.path.basename(p)[9:19]) for p in written] == snapshot_images(cfg.finetune) == [12, 24]
    sweep = json.loads((out / "sweep.json").read_text())
    entries = sweep["snapshots"]
    assert [e["snapshot"] for e in entries] == [os.path.basename(p) for p in written]
    for e in entries:
        assert set(e) == {"snapshot", "images", "best", "final"} and e["images"] == int(e["snapshot"][9:19])
        own = json.loads((out / "sweep" / f"{os.path.splitext(e['snapshot'])[0]}.json").read_text())
        assert e["best"] == min(own["points"], key=lambda p: p["fid"])          # that snapshot's own sweep
        assert (e["final"]["w"], e["final"]["cfg"]) == (e["best"]["w"], e["best"]["cfg"])
        assert e["final"]["num_images"] == 9
    chosen = min(entries, key=lambda e: e["final"]["fid"])
    assert sweep["best_snapshot"] == chosen["snapshot"] == sweep["best"]["snapshot"]
    assert doc["stages"]["sweep"]["theta_s"].endswith(chosen["snapshot"])
    final = doc["stages"]["final"]
    assert final["neon"] == chosen["final"] and final["snapshot"] == chosen["snapshot"]
    assert (out / "sweep.png").is_file() and all((out / "sweep" / f"{n}.png").is_file()
                                                 for n in (os.path.splitext(e["snapshot"])[0] for e in entries))


def test_the_saved_theta_neon_merges_the_best_snapshot_at_its_best_w(full_run):
    import torch

    from neon.checkpoint import load_state_dict
    from neon.merge import merge_tensor
    from neon.testing import TinyPixFamily
    out, _, _ = full_run
    best = json.loads((out / "run.json").read_text())["stages"]["sweep"]["best"]
    theta_r = TinyPixFamily().tiny(seed=0, **CONFIG["load_args"]).net.state_dict()   # the smoke run's θr
    theta_s = load_state_dict(str(out / "finetune" / best["snapshot"]))
    neon = load_state_dict(str(out / "neon.pth"))
    assert set(neon) == set(theta_r)
    assert all(torch.equal(neon[k], merge_tensor(theta_r[k], theta_s[k], best["w"])) for k in neon)


def test_final_records_the_sampler_and_disjoint_seed_ranges_of_theta_r_and_theta_neon(full_run):
    out, _, _ = full_run
    doc = json.loads((out / "run.json").read_text())
    base, neon = doc["stages"]["final"]["base"], doc["stages"]["final"]["neon"]
    assert base["sampler"] == CONFIG["final"]["base_sampler"]          # θr at its own settings, not Neon's
    assert neon["sampler"] == {}                                       # final.sampler, no guidance swept here
    assert base["seeds"] == neon["seeds"] == [1000, 1008]
    assert doc["stages"]["sweep"]["seeds"] == [100, 105]
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Snapshots" in card and f"Best snapshot (lowest final FID): {doc['stages']['final']['snapshot']}" in card
    assert "seeds 1000–1008" in card and "num_steps=2" in card


def test_a_run_killed_mid_sweep_resumes_at_that_snapshot_and_point_with_the_same_result(full_run, tmp_path):
    """The folder a kill leaves during the second snapshot's sweep: the first snapshot done (its final file),
    the second with its first grid point on disk, no sweep/final stage, no θneon. The rerun computes only what is
    missing and ends where the uninterrupted run did."""
    out, config, _ = full_run
    cut = tmp_path / "run"
    shutil.copytree(out, cut)
    for path in cut.rglob("*.json"):   # what the run recorded names its own folder
        path.write_text(path.read_text().replace(str(out), str(cut)))
    doc = json.loads((cut / "run.json").read_text())
    second = os.path.splitext(os.path.basename(doc["stages"]["finetune"]["snapshots"][1]))[0]
    points_file = cut / "sweep" / f"{second}.json"
    points = json.loads(points_file.read_text())
    first_walked = min(CONFIG["sweep"]["w"])   # the walk goes up the grid in w, then refines
    kept = [p for p in points["points"] if p["w"] == first_walked]
    lost = [p for p in points["points"] if p["w"] != first_walked]
    points_file.write_text(json.dumps({**points, "points": kept, "best": kept[0]}))
    for name in ("neon.pth", "MODEL_CARD.md", "sweep.json", "sweep.png", f"sweep/{second}-final.json",
                 f"sweep/{second}.png"):
        (cut / name).unlink()
    (cut / "run.json").write_text(json.dumps({**doc, "stages": {k: doc["stages"][k] for k in ("sample", "finetune")}}))

    res = _run(config, cut)
    assert res.returncode == 0, res.stderr[-2000:]
    evaluated = [line for line in res.stdout.splitlines() if line.startswith("w=")]
    assert len(evaluated) == len(lost) and f"w={kept[0]['w']:g}: " not in res.stdout   # only the missing points
    assert "sweeping θs = snapshot-0000000012" not in res.stdout                        # the first one not again
    for name in ("run.json", "sweep.json"):
        resumed, whole = _read(cut / name, (cut, out)), _read(out / name)
        assert _without_seconds(resumed.get("stages", resumed)) == _without_seconds(whole.get("stages", whole))


def test_overlapping_final_seeds_are_refused_in_one_line_before_anything_is_written(tmp_path):
    config = {**CONFIG, "final": {**CONFIG["final"], "seed_offset": 104}}
    res = _run_config(config, tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "final.seed_offset: final seeds 104–112 overlap the sweep's 100–105 " \
           "(set final.allow_overlap: true to allow)" in res.stderr
    assert not (tmp_path / "r").exists()


def test_per_class_seed_ranges_are_checked_with_the_models_class_count(tmp_path):
    # The config states 1 sweep image, but per_class 2 of the model's 3 classes is 6 seeds (100-105): only the
    # loaded model tells; the refusal still comes before anything is written.
    config = {**CONFIG, "sweep": {**CONFIG["sweep"], "per_class": 2, "num_images": 1},
              "final": {**CONFIG["final"], "seed_offset": 103}}
    parse_config(config, smoke=True)                                 # the config alone cannot see it
    res = _run_config(config, tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "final seeds 103–111 overlap the sweep's 100–105" in res.stderr
    assert not (tmp_path / "r").exists()


def test_allow_overlap_accepts_overlapping_seeds():
    data = {**CONFIG, "final": {**CONFIG["final"], "seed_offset": 100}}
    with pytest.raises(ConfigError, match="overlap"):
        parse_config(data, smoke=True)
    data["final"]["allow_overlap"] = True
    assert parse_config(data, smoke=True).final.allow_overlap


def test_unset_final_seed_offset_starts_just_past_the_sweeps_seeds():
    from neon.config import final_seed_offset
    data = {**CONFIG, "final": {k: v for k, v in CONFIG["final"].items() if k != "seed_offset"}}
    cfg = parse_config(data, smoke=True)
    assert cfg.final.seed_offset is None and final_seed_offset(cfg) == 106
    per_class = parse_config({**data, "sweep": {**CONFIG["sweep"], "per_class": 3}}, smoke=True)
    assert final_seed_offset(per_class, num_classes=3) == 109


SNAPSHOTS = ["/r/finetune/snapshot-0000000012.pth", "/r/finetune/snapshot-0000000024.pth"]


def test_snapshots_are_chosen_by_last_all_file_name_or_image_count():
    assert select_snapshots(SNAPSHOTS, "last") == SNAPSHOTS[1:]
    assert select_snapshots(SNAPSHOTS, "all") == SNAPSHOTS
    assert select_snapshots(SNAPSHOTS, "snapshot-0000000012.pth") == SNAPSHOTS[:1]
    assert select_snapshots(SNAPSHOTS, ["snapshot-0000000024.pth", "snapshot-0000000012.pth"]) == SNAPSHOTS[::-1]
    assert select_snapshots(SNAPSHOTS, [12, 24]) == SNAPSHOTS
    assert select_snapshots(SNAPSHOTS, [24]) == SNAPSHOTS[1:]
    assert select_snapshots(SNAPSHOTS, ["snapshot-0000000024"]) == SNAPSHOTS[1:]   # the extension may be left off


def test_an_unknown_snapshot_is_refused_in_one_line():
    with pytest.raises(NeonError) as info:
        select_snapshots(SNAPSHOTS, [12, 36])
    assert str(info.value).startswith("sweep.snapshot[1]: no snapshot 36") and "\n" not in str(info.value)
    for choice, message in (([36], r"sweep\.snapshot\[0\]: no snapshot at 36 images \(self-training writes them "
                                   r"at 12, 24 images\)"),
                            ("snapshot-0000000036.pth", r"sweep\.snapshot: no snapshot at 36 images"),
                            ("snapshot-0000000024.pkl", r"sweep\.snapshot: 'snapshot-0000000024\.pkl': this run's "
                                                        r"snapshots are \.pth files \(snapshot-0000000024\.pth\)"),
                            (["final"], r"sweep\.snapshot\[0\]: 'final' is not 'last', 'all' or a snapshot name"),
                            ([], r"sweep\.snapshot: an empty list")):
        with pytest.raises(ConfigError, match=message) as info:
            parse_config({**CONFIG, "sweep": {**CONFIG["sweep"], "snapshot": choice}}, smoke=True)
        assert "\n" not in str(info.value)
    for choice in ([12], [24, 12], "snapshot-0000000024.pth", "snapshot-0000000024", "last", "all"):
        parse_config({**CONFIG, "sweep": {**CONFIG["sweep"], "snapshot": choice}}, smoke=True)


def test_missing_base_checkpoint_is_one_line(tmp_path):
    config = dict(CONFIG, base=str(tmp_path / "nope.pth"), load_args={})   # num_classes is the tiny network's
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")],
                         env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "nope.pth not found" in res.stderr and res.stderr.count("\n") == 1
