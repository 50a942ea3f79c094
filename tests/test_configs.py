"""Every config in configs/ validates, and `neon run CONFIG --smoke` runs all its stages on CPU."""
import dataclasses
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neon.config import (
    METHOD_KIND,
    ConfigError,
    check_seed_overlap,
    config_kind,
    final_seed_offset,
    load_config,
    parse_config,
    seed_range,
    snapshot_images,
)
from neon.family import TrainDefaults, arg_names, get_family

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
PAPER_ROWS = [c for c in CONFIGS if config_kind(str(c)) == METHOD_KIND]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INSTALLED_FAMILIES = sorted(ep.name for ep in importlib.metadata.entry_points(group="neon.families"))


def test_there_is_one_config_per_paper_row():
    names = {c.stem for c in PAPER_ROWS}
    assert {"edm_cifar10_cond", "edm_cifar10_uncond", "edm_ffhq64", "var_d16_256", "var_d36_512", "xar_b_256",
            "xar_l_256", "imm_in256"} <= names


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_config_validates_as_is_and_with_smoke(config):
    cfg = load_config(str(config))
    assert cfg.base and cfg.ref_stats, "a paper row names its base checkpoint and reference statistics"
    smoke = load_config(str(config), smoke=True)
    assert smoke.base is None


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_a_paper_row_evaluates_theta_r_with_its_own_sampler_settings(config):
    cfg = load_config(str(config))
    assert cfg.final.evaluate_base and cfg.final.base_sampler, "final.base_sampler: θr's published settings"


def _swept(cfg) -> list[int]:
    written = snapshot_images(cfg.finetune)
    choice = cfg.sweep.snapshot
    return written[-1:] if choice == "last" else written if choice == "all" else \
        [n for n in written if n in choice or f"snapshot-{n:010d}" in str(choice)]


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_final_seeds_are_apart_from_the_sweeps(config, smoke):
    cfg = load_config(str(config), smoke=smoke)
    assert not cfg.final.allow_overlap
    classes = 1000 if not smoke and cfg.sweep.per_class else None   # the ImageNet rows' per-class plans
    sweep = seed_range(cfg.sweep.num_images, cfg.sweep.per_class, cfg.sweep.seed_offset, classes)
    final = seed_range(cfg.final.num_images, cfg.final.per_class, final_seed_offset(cfg, classes), classes)
    assert final[1] < sweep[0] or sweep[1] < final[0], (sweep, final)
    check_seed_overlap(cfg, classes)


# The snapshots the official scripts sweep (SinaAlemohammad/Neon @76496c3): VAR/*/run_var_imagenet_*.sh and
# xAR/run_xar{b,l}.sh list them by images seen (EPOCHS); edm/cal_metrics_all.py and imm/run_imm_imagenet_256.sh
# take every network-snapshot-*.pkl of the run, named by kimg at a tick's end (EDM) or by tick (IMM): their count,
# past EDM's tick-0 file, which cal_metrics_all.py skips (12: every 10th or 5th tick and the last step, as
# tests/test_official_knobs.py replays the loop; IMM: 60 ticks).
OFFICIAL_SNAPSHOTS = {
    "edm_cifar10_cond": 12,
    "edm_cifar10_uncond": 12,
    "edm_ffhq64": 12,
    "var_d16_256": [250368, 500736, 750336, 1000704, 1250304, 1500672, 1750272, 2000640, 2250240, 2500608, 2750208,
                    3000576, 3250176, 3500544, 3750144, 4000512, 4250112, 4500480, 4750080, 5000448, 5250048,
                    5500416, 5750016, 6000384, 6250752, 6500352, 6750720, 7000320, 7250688],
    "var_d36_512": [200016, 400008, 600000, 800016, 1000008, 1200000, 1400016, 1600008, 1800000, 2000016, 2200008,
                    2400000, 2600016, 2800008, 3000000],
    "xar_b_256": [250112, 500224, 750080, 1000192, 1250048, 1500160, 1750016, 2000128, 2250240, 2500096, 2750208,
                  3000064, 3250176, 3500032, 3750144, 4000000, 4250112, 4500224, 4750080, 5000192, 5250048, 5500160,
                  5750016, 6000128, 6250240, 6500096, 6750208, 7000064, 7250176],
    "imm_in256": 60,
}
OFFICIAL_SNAPSHOTS["xar_l_256"] = OFFICIAL_SNAPSHOTS["xar_b_256"]


@pytest.mark.parametrize("row", sorted(OFFICIAL_SNAPSHOTS))
def test_a_paper_row_sweeps_the_snapshots_the_official_script_sweeps(row):
    swept, official = _swept(load_config(str(REPO / "configs" / f"{row}.yaml"))), OFFICIAL_SNAPSHOTS[row]
    assert (len(swept) if isinstance(official, int) else swept) == official


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_a_smoke_run_sweeps_at_least_two_snapshots(config):
    assert len(_swept(load_config(str(config), smoke=True))) >= 2


def _smoke_images(section, num_classes: int) -> int:
    return section.num_images if section.per_class is None else section.per_class * num_classes


def _load_arg_checks() -> dict:
    """What a paper row of each family must name besides its checkpoint (the official files it needs)."""
    from xar.model import CONFIGS as XAR_SIZES
    return {"var": lambda a: a.get("vae_path"), "xar": lambda a: a.get("vae_path") and a.get("model") in XAR_SIZES,
            "imm": lambda a: a.get("vae_path")}


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_every_argument_of_a_config_is_one_its_family_declares(config, smoke):
    cfg = load_config(str(config), smoke=smoke)        # refuses undeclared arguments; the same rule spelled out:
    family = get_family(cfg.family)
    sampler = set(arg_names(family.SAMPLER_ARGS))
    for section in (cfg.synthetic, cfg.sweep, cfg.final):
        assert set(section.sampler) <= sampler, section
    assert set(cfg.sweep.grid) <= sampler
    assert cfg.sweep.cfg is None or cfg.sweep.cfg_key in sampler
    assert set(cfg.finetune.loss_args) <= set(arg_names(family.LOSS_ARGS))
    assert set(cfg.finetune.optimizer) <= {f.name for f in dataclasses.fields(TrainDefaults)}
    if smoke:
        assert cfg.base is None and cfg.ref_stats is None
        assert set(cfg.load_args) <= set(arg_names(family.LOAD_ARGS + family.TINY_ARGS))
        tiny = family.tiny(**cfg.load_args)             # the smoke counts are CPU-sized (a few dozen images)
        for section in (cfg.synthetic, cfg.sweep, cfg.final):
            assert _smoke_images(section, tiny.num_classes) <= 64, section
        assert cfg.finetune.total_images <= 64
    else:
        assert set(cfg.load_args) <= set(arg_names(family.LOAD_ARGS))
        assert _load_arg_checks().get(cfg.family, lambda a: True)(cfg.load_args), cfg.load_args


def _keywords(fn, positional: int) -> tuple[set[str], bool]:
    """The keyword parameters of a method after its first `positional` ones, and whether it takes **kwargs."""
    params = list(inspect.signature(fn).parameters.values())[positional:]
    return ({p.name for p in params if p.kind is not p.VAR_KEYWORD},
            any(p.kind is p.VAR_KEYWORD for p in params))


@pytest.mark.parametrize("name", INSTALLED_FAMILIES)
def test_declared_arguments_are_the_methods_keywords(name):
    """What a family declares is what its methods take: nothing declared is refused by the method, nothing the
    method takes by name is missing from the declaration (a **kwargs method passes its keywords on)."""
    family = get_family(name)
    for fn, positional, declared in ((family.sample, 3, family.SAMPLER_ARGS), (family.loss, 2, family.LOSS_ARGS),
                                     (family.load, 2, family.LOAD_ARGS),
                                     (family.tiny, 2, family.LOAD_ARGS + family.TINY_ARGS)):
        named, takes_more = _keywords(fn, positional)
        if fn.__name__ == "sample":
            named -= {"batch_invariant"}  # the core's own keyword (neon.sampling.draw_batch), not a sampler argument
        assert named <= set(arg_names(declared)), (fn.__name__, named)
        assert takes_more or set(arg_names(declared)) <= named, (fn.__name__, declared)


def test_bad_fields_are_named_in_one_line(tmp_path):
    cases = [({"family": "edm", "finetune": {"lr": "fast"}}, r"finetune\.lr: expected a number"),
             ({"family": "edm", "sweep": {"ww": [0]}}, r"sweep\.ww: unknown field"),
             ({"synthetic": {"num_images": 4}}, r"family: required field is missing"),
             ({"family": "edm", "synthetic": {"num_images": 4, "labels": "some"}}, r"synthetic\.labels"),
             ({"family": "edm", "finetune": {"ema": {"decay": 0.9}}}, r"finetune\.ema")]
    for data, message in cases:
        data.setdefault("synthetic", {"num_images": 4})
        with pytest.raises(ConfigError, match=message) as info:
            parse_config(data)
        assert "\n" not in str(info.value)
    overlap = {"family": "edm", "synthetic": {"num_images": 4}, "final": {"seed_offset": 5000}}
    with pytest.raises(ConfigError, match=r"^final\.seed_offset: final seeds 5000–54999 overlap the sweep's "
                                          r"0–9999 \(set final\.allow_overlap: true to allow\)$"):
        parse_config(overlap)
    parse_config({**overlap, "final": {"seed_offset": 5000, "allow_overlap": True}})
    with pytest.raises(ConfigError, match=r"^final\.base_sampler\.num_stepz: unknown argument \(known: num_steps"):
        parse_config({"family": "edm", "synthetic": {"num_images": 4}, "final": {"base_sampler": {"num_stepz": 8}}},
                     family_args=True)
    with pytest.raises(ConfigError, match=r"^sweep\.snapshot\[0\]: no snapshot at 5 images"):
        parse_config({"family": "edm", "synthetic": {"num_images": 4}, "sweep": {"snapshot": [5]}})
    (tmp_path / "bad.yaml").write_text("family: edm\nsweep: {w: [0, 1}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    assert parse_config({"family": "x", "synthetic": {"num_images": 2}, "finetune": {"lr": "1e-5"}}).finetune.lr == 1e-5


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_smoke_run_goes_through_every_stage(config, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(config), "--smoke", "--out", str(out)],
                         env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "run.json").read_text())
    baselines = {"baselines"} if load_config(str(config), smoke=True).baselines.enabled() else set()
    assert set(doc["stages"]) == {"sample", "finetune", "sweep", "final"} | baselines and doc["smoke"] is True
    final = doc["stages"]["final"]
    assert final["neon"]["fid"] is not None
    for name in ("synthetic.npz", "sweep.json", "sweep.png"):
        assert (out / name).is_file(), name
    neon_lora = out / "neon_lora"   # θneon as a LoRA too, when self-training trained adapters
    assert neon_lora.is_dir() == bool(load_config(str(config), smoke=True).finetune.lora)
    (neon,) = [p for p in out.glob("neon*") if p != neon_lora]
    snapshots = list((out / "finetune").glob("snapshot-*"))
    assert snapshots
    if neon.is_dir():   # a family that saves folders names them without a file extension
        assert neon.name == "neon" and all(p.is_dir() and not p.suffix for p in snapshots), (neon, snapshots)
    else:
        assert neon.suffix and all(p.suffix == neon.suffix for p in snapshots), (neon, snapshots)
    swept = json.loads((out / "sweep.json").read_text())["snapshots"]
    # official / grid: the snapshot with the lowest final; adaptive: the one its race chose, the only one evaluated
    assert len(swept) >= 2 and final["snapshot"] == min((e for e in swept if "final" in e),
                                                        key=lambda e: e["final"]["fid"])["snapshot"]
    assert doc["config"]["sweep"]["search"] != "adaptive" or sum("final" in e for e in swept) == 1
    cfg = load_config(str(config), smoke=True)
    for pair in final.get("per_setting") or [final]:   # θr at its own settings (a grid's setting applied)
        assert pair["base"]["sampler"] == {**cfg.final.base_sampler, **pair["neon"]["setting"]}
        first, last = doc["stages"]["sweep"]["seeds"]
        assert pair["base"]["seeds"] == pair["neon"]["seeds"] and (pair["neon"]["seeds"][0] > last
                                                                   or pair["neon"]["seeds"][1] < first)
