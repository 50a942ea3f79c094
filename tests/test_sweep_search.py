"""`search: official` replays the official Neon scripts' w-search point for point.

Each family's script loop (SinaAlemohammad/Neon @76496c3) is transcribed below as a small function, written from
the script and independent of neon/search.py, with the script's own constants (tolerance, refinement step, number
formats). It and our search walk the same synthetic FID surfaces over the w / cfg lists of the family's config, and
must visit the same (w, cfg) points in the same order and pick the same best point. The surfaces exercise every
rule (each test checks which ones fired): the cfg and w early stops, the refinement, ties, w ≤ 0 neighbours and
printf's rounding.
"""
import dataclasses
import json
import math
import re
from decimal import Decimal as D
from pathlib import Path

import numpy as np
import pytest
import torch

from neon.config import ConfigError, SettingGrid, SweepConfig, load_config
from neon.family import Arg, Bundle, Family, TrainDefaults
from neon.search import official_search, printf_round
from neon.sweep import Sweep, neon_sweep, setting_grids

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HIGH = D(1000000)


def sweep_section(name: str) -> SweepConfig:
    return load_config(str(CONFIGS / f"{name}.yaml")).sweep


def dec(x: float) -> D:
    return D(repr(float(x)))


# `printf '%.1f' X` for X = 0.05, 0.15, ..., 6.95, as bash 5.2.15 prints it on x86-64 Linux (its printf reads X
# into a long double, so the halves do not round alike: 1.15 -> 1.1 but 1.45 -> 1.5).
BASH_PRINTF_1 = ("0.1 0.2 0.2 0.3 0.4 0.6 0.6 0.8 0.9 0.9 1.0 1.1 1.2 1.4 1.5 1.5 1.6 1.8 1.9 2.0 2.0 2.2 2.2 2.3 2.5 "
                 "2.5 2.7 2.8 2.8 3.0 3.0 3.2 3.2 3.3 3.5 3.5 3.7 3.8 3.8 4.0 4.1 4.2 4.2 4.3 4.4 4.6 4.7 4.8 4.8 4.9 "
                 "5.1 5.2 5.2 5.3 5.4 5.6 5.7 5.8 5.8 5.9 6.1 6.2 6.2 6.3 6.4 6.6 6.7 6.8 6.8 6.9").split()


def bash_printf_1(x: D) -> D:
    """printf '%.1f' of a bc sum with at most two decimals (the table above for the x.x5 halves)."""
    if x == x.quantize(D("0.1")):
        return x.quantize(D("0.1"))
    assert x == x.quantize(D("0.01")) and (x * 100) % 10 == 5 and 0 < x < 7, f"no table entry for {x}"
    return D(BASH_PRINTF_1[int(x * 10)])


def bash_printf_3(x: D) -> D:
    """printf '%.3f' of a bc sum of numbers with at most two decimals: exact, no rounding happens."""
    assert x == x.quantize(D("0.01")), x
    return x.quantize(D("0.001"))


class Replay:
    """Records the points a transcribed script asks for, and which of its rules fired."""

    def __init__(self, surface):
        self.surface, self.visits, self.events = surface, [], set()

    def fid(self, w, cfg=None):
        point = (float(w), None if cfg is None else float(cfg))
        self.visits.append(point)
        return self.surface(*point)


def var_script(surface, w_values, cfg_values, refine: bool) -> Replay:
    """VAR/VAR_imagenet_256/run_var_imagenet_256.sh lines 61-159 (refine=True). VAR/VAR_imagenet_512/
    run_var_imagenet_512.sh lines 60-116 is the same coarse walk and has no step 2 (refine=False). bc compares the
    printed decimals exactly; the FID files hold Python's repr of the FID."""
    r, TOLERANCE = Replay(surface), D("0.03")
    last_min, stop_w = HIGH, False
    best_fid, best_w, best_cfg = HIGH, D(0), D(0)
    for w in map(dec, w_values):
        if stop_w:
            break
        min_fid_w, stop_cfg = HIGH, False
        for cfg in map(dec, cfg_values):
            if stop_cfg:
                break
            fid = dec(r.fid(w, cfg))
            if fid < min_fid_w:
                min_fid_w = fid
            if fid < best_fid:
                best_fid, best_w, best_cfg = fid, w, cfg
            if fid > min_fid_w + TOLERANCE:
                stop_cfg = True
                r.events.add("cfg loop stopped")
        if min_fid_w > last_min + TOLERANCE:
            stop_w = True
            r.events.add("w loop stopped")
        last_min = min_fid_w
    if refine:   # 2) Refinement around the best (±0.1): best_w / best_cfg are read again at every step
        for dw in ("-0.1", "0", "0.1"):
            w_r = bash_printf_1(best_w + D(dw))
            if w_r <= 0:
                r.events.add("w <= 0 skipped")
                continue
            for dc in ("-0.1", "0", "0.1"):
                cfg_r = bash_printf_1(best_cfg + D(dc))
                if cfg_r != best_cfg + D(dc):
                    r.events.add("printf rounded")
                if cfg_r <= 0:
                    continue
                if dw == "0" and dc == "0":
                    continue
                fid = dec(r.fid(w_r, cfg_r))
                if fid < best_fid:
                    best_fid, best_w, best_cfg = fid, w_r, cfg_r
                    r.events.add("refinement found a better point")
    r.best = (float(best_w), float(best_cfg), float(best_fid))
    return r


def xar_script(surface, w_values, cfg_values, tolerance: str) -> Replay:
    """xAR/run_xarb.sh lines 55-163 (TOLERANCE=0.03, line 35); xAR/run_xarl.sh lines 54-162 is the same loop with
    TOLERANCE=0.02. Coarse walk as VAR's; the refinement's centre is frozen and its values printed with %.3f."""
    r, TOLERANCE = Replay(surface), D(tolerance)
    last_min_fid, stop_w_loop = D(1000), False
    global_min_fid, global_min_w, global_min_cfg = D(1000), D(0), D(0)
    for w in map(dec, w_values):
        if stop_w_loop:
            break
        min_fid_this_w, stop_cfg_loop = D(1000), False
        for cfg in map(dec, cfg_values):
            if stop_cfg_loop:
                break
            fid = dec(r.fid(w, cfg))
            if fid < min_fid_this_w:
                min_fid_this_w = fid
            if fid < global_min_fid:
                global_min_fid, global_min_w, global_min_cfg = fid, w, cfg
            if fid > min_fid_this_w + TOLERANCE:
                stop_cfg_loop = True
                r.events.add("cfg loop stopped")
        if min_fid_this_w > last_min_fid + TOLERANCE:
            stop_w_loop = True
            r.events.add("w loop stopped")
        last_min_fid = min_fid_this_w
    centre_w, centre_cfg = global_min_w, global_min_cfg
    for dw in ("-0.1", "0", "0.1"):
        w_ref = bash_printf_3(centre_w + D(dw))
        if w_ref <= 0:
            continue
        for dc in ("-0.1", "0", "0.1"):
            cfg_ref = bash_printf_3(centre_cfg + D(dc))
            if cfg_ref <= 0:
                continue
            if dw == "0" and dc == "0":
                continue
            fid = dec(r.fid(w_ref, cfg_ref))
            if fid < global_min_fid:
                global_min_fid, global_min_w, global_min_cfg = fid, w_ref, cfg_ref
                r.events.add("refinement found a better point")
    r.best = (float(global_min_w), float(global_min_cfg), float(global_min_fid))
    return r


def edm_script(surface, w_values) -> Replay:
    """edm/cal_metrics_all.py lines 241-344, one snapshot (Python floats)."""
    r = Replay(surface)
    prev_fid, threshold, best_fid, best_w = None, 0.03, float("inf"), None
    for diff_weight in w_values:
        fid_value = r.fid(diff_weight)
        stop_flag = False
        if prev_fid is not None and fid_value > prev_fid + threshold:
            stop_flag = True
            r.events.add("w loop stopped")
        prev_fid = fid_value
        if fid_value < best_fid:
            best_fid, best_w = fid_value, diff_weight
        if stop_flag:
            break
    r.best = (best_w, None, best_fid)
    return r


def imm_script(surface, w_values, cfg_values) -> Replay:
    """imm/run_imm_imagenet_256.sh lines 91-163, one STEPS and one snapshot. awk compares doubles; add_tol prints
    the threshold with %.8f (line 42)."""
    r, TOL = Replay(surface), 0.03
    best_overall_fid, best_overall_w, best_overall_cfg = 1e9, None, None
    best_wmin_so_far = 1e9
    for W in w_values:
        cur_w_min = 1e9
        for CFG in cfg_values:
            FID_VAL = r.fid(W, CFG)
            if FID_VAL > float(f"{cur_w_min + TOL:.8f}"):      # rule #1, before the point counts
                r.events.add("cfg loop stopped")
                break
            cur_w_min = min(cur_w_min, FID_VAL)
            if FID_VAL < best_overall_fid:
                best_overall_fid, best_overall_w, best_overall_cfg = FID_VAL, W, CFG
        if cur_w_min == 1e9:
            continue
        if cur_w_min > float(f"{best_wmin_so_far + TOL:.8f}"):  # rule #2: against the best w so far
            r.events.add("w loop stopped")
            break
        best_wmin_so_far = min(best_wmin_so_far, cur_w_min)
    r.best = (best_overall_w, best_overall_cfg, best_overall_fid)
    return r


def ours(surface, cfg: SweepConfig, w_values, cfg_values) -> Replay:
    r = Replay(surface)
    r.best = official_search(r.fid, w_values, cfg_values, cfg.tolerance, cfg.stop, cfg.refine, cfg.refine_pattern,
                             cfg.refine_centre, cfg.refine_decimals)
    return r


# ---------------------------------------------------------------------------------------------------------
# Synthetic FID surfaces over a grid: values rounded to 4 decimals, so ties and exact tolerance steps occur.

def bowl(w0, c0, a=1.0, b=1.0, wiggle=0.0, base=2.0):
    """A paraboloid with its minimum at (w0, c0), plus a deterministic wiggle that makes the stops irregular."""
    def f(w, c=None):
        c = c0 if c is None else c
        return round(base + a * (w - w0) ** 2 + b * (c - c0) ** 2 + wiggle * math.sin(7.3 * w + 5.1 * c), 4)
    return f


def surfaces(w_values, cfg_values, seed: int, count: int = 24) -> dict:
    """Named surfaces that each trigger a rule, plus `count` random bowls, for the grid w_values x cfg_values."""
    w_lo, w_hi = min(w_values), max(w_values)
    c_lo, c_hi = (min(cfg_values), max(cfg_values)) if cfg_values else (0.0, 0.0)
    w_mid, c_mid = (w_lo + w_hi) / 2, (c_lo + c_hi) / 2
    named = {
        "bowl inside the grid": bowl(w_mid + 0.05, c_mid + 0.05, 0.3, 0.3),
        "rises at once": lambda w, c=None: round(2 + w + (c or 0), 4),
        "flat (every point ties)": lambda w, c=None: 2.0,
        "plateau (ties at the bottom)": lambda w, c=None: max(2.0, bowl(w_mid, c_mid, 0.5, 0.5)(w, c)),
        # the lowest FID per w climbs 0.02 per 0.2 step: never > 0.03 above the previous w, soon above the best
        "slow drift along w": lambda w, c=None: round(2 + 0.1 * (w - w_lo) + 0.5 * ((c or 0) - c_mid) ** 2, 4),
        "steep along cfg": bowl(w_mid, c_lo + 0.05, 0.05, 5.0),
        "minimum below the grid's first w": bowl(w_lo - 0.5, c_lo, 1.0, 1.0),
        "minimum off the grid on a diagonal": bowl(w_mid + 0.13, c_mid + 0.13, 2.0, 2.0),
        "minimum past the grid's last w": bowl(w_hi + 1.0, c_hi + 1.0, 0.05, 0.05),
    }
    rng = np.random.default_rng(seed)
    for i in range(count):
        w0, c0 = rng.uniform(w_lo - 0.3, w_hi + 0.3), rng.uniform(c_lo - 0.3, c_hi + 0.3)
        a, b = 10 ** rng.uniform(-2, 0.5), 10 ** rng.uniform(-2, 0.5)
        named[f"random bowl {i}"] = bowl(w0, c0, a, b, wiggle=float(rng.choice([0.0, 0.005, 0.02, 0.05])))
    return named


def off_the_decimal_grid(f):
    """f plus a tiny irregular term, so that no FID difference equals the tolerance exactly: EDM's Python and IMM's
    awk compare in binary floating point where bc (and our search) compare decimals, which differ only there.
    (The flat surface is left as it is: its differences are all zero, and its ties test the choice of the best.)"""
    return lambda w, c=None: f(w, c) + 1e-7 * math.sin(w + (c or 0))


def assert_same_walk(script: Replay, mine: Replay, name: str):
    assert mine.visits == script.visits, f"{name}: visited points differ"
    assert mine.best == script.best, f"{name}: best point differs"


# ---------------------------------------------------------------------------------------------------------
# One replay test per family

@pytest.mark.parametrize("config", ["edm_cifar10_cond", "edm_cifar10_uncond", "edm_ffhq64"])
def test_edm_search_replays_cal_metrics_all(config):
    cfg = sweep_section(config)
    (_, w_values, cfg_values), = setting_grids(cfg)
    assert cfg_values is None
    events = set()
    for name, f in surfaces(w_values, [], seed=1).items():
        g = f if name.startswith("flat") else off_the_decimal_grid(f)
        script = edm_script(g, w_values)
        assert_same_walk(script, ours(g, cfg, w_values, None), name)
        events |= script.events | ({"walked every w"} if len(script.visits) == len(w_values) else set())
    assert events == {"w loop stopped", "walked every w"}


def test_var_d16_search_replays_run_var_imagenet_256():
    cfg = sweep_section("var_d16_256")
    (_, w_values, cfg_values), = setting_grids(cfg)
    events = set()
    for name, f in surfaces(w_values, cfg_values, seed=2).items():
        script = var_script(f, w_values, cfg_values, refine=True)
        assert_same_walk(script, ours(f, cfg, w_values, cfg_values), name)
        events |= script.events
    assert events == {"cfg loop stopped", "w loop stopped", "refinement found a better point", "w <= 0 skipped",
                      "printf rounded"}


def test_var_d36_search_replays_run_var_imagenet_512():
    cfg = sweep_section("var_d36_512")
    (_, w_values, cfg_values), = setting_grids(cfg)
    events = set()
    for name, f in surfaces(w_values, cfg_values, seed=3).items():
        script = var_script(f, w_values, cfg_values, refine=False)
        assert_same_walk(script, ours(f, cfg, w_values, cfg_values), name)
        events |= script.events
    assert events == {"cfg loop stopped", "w loop stopped"}


@pytest.mark.parametrize("config, tolerance", [("xar_b_256", "0.03"), ("xar_l_256", "0.02")])
def test_xar_search_replays_run_xar(config, tolerance):
    cfg = sweep_section(config)
    (_, w_values, cfg_values), = setting_grids(cfg)
    events = set()
    for name, f in surfaces(w_values, cfg_values, seed=4).items():
        script = xar_script(f, w_values, cfg_values, tolerance)
        assert_same_walk(script, ours(f, cfg, w_values, cfg_values), name)
        events |= script.events
    assert events == {"cfg loop stopped", "w loop stopped", "refinement found a better point"}


def test_imm_search_replays_run_imm_imagenet_256_for_every_step_count():
    cfg = sweep_section("imm_in256")
    grids = setting_grids(cfg)
    assert [s["steps"] for s, _, _ in grids] == [1, 2, 4, 8]
    for setting, w_values, cfg_values in grids:
        events = set()
        for name, f in surfaces(w_values, cfg_values, seed=5 + setting["steps"]).items():
            g = f if name.startswith("flat") else off_the_decimal_grid(f)
            script = imm_script(g, w_values, cfg_values)
            assert_same_walk(script, ours(g, cfg, w_values, cfg_values), f"steps={setting['steps']}: {name}")
            events |= script.events
        assert events == {"cfg loop stopped", "w loop stopped"}, setting


def test_imm_w_loop_stops_against_the_best_w_so_far_not_the_previous_one():
    # Lowest FID per w: 2.00, 2.02, 2.04, ...: each within 0.03 of the previous w, the third not of the best.
    w_values, cfg_values = [0.0, 0.2, 0.4, 0.6, 0.8], [1.5]
    f = lambda w, c: round(2 + 0.1 * w, 4) + 1e-7   # noqa: E731
    script = imm_script(f, w_values, cfg_values)
    assert [w for w, _ in script.visits] == [0.0, 0.2, 0.4]
    cfg = sweep_section("imm_in256")
    assert_same_walk(script, ours(f, cfg, w_values, cfg_values), "drift")
    previous = ours(f, dataclasses.replace(cfg, stop="previous"), w_values, cfg_values)
    assert len(previous.visits) == len(w_values)


# ---------------------------------------------------------------------------------------------------------
# Rounding, validation and the wiring through Sweep

def test_printf_round_matches_bash_printf_on_every_half():
    for i, printed in enumerate(BASH_PRINTF_1):
        assert printf_round(D(f"{i // 10}.{i % 10}5"), 1) == D(printed)
    assert printf_round(D("1.45"), 3) == D("1.450") and printf_round(D("-0.05"), 1) == D("-0.1")


@pytest.mark.parametrize("fields, message", [
    ({"search": "greedy"}, "sweep.search: expected 'adaptive', 'grid' or 'official'"),
    ({"stop": "previous"}, "sweep.stop: only used by search: official"),
    ({"search": "official", "tolerance": 0.03}, "sweep.stop: search: official needs one of previous, best"),
    ({"search": "official", "refine": 0.1, "refine_centre": "frozen"}, "sweep.refine_pattern: search: official"),
    ({"search": "official", "refine": 0.1, "refine_pattern": "ring", "refine_centre": "frozen"},
     "sweep.refine_pattern: expected one of 3x3, cross, got 'ring'"),
    ({"grid": {"steps": [1]}, "per_setting": [SettingGrid({"steps": 2})]}, "sweep.per_setting: give either"),
    ({"per_setting": [SettingGrid({"steps": 2}), SettingGrid({"steps": 2})]}, "sweep.per_setting[1].setting"),
])
def test_bad_search_fields_are_refused_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        SweepConfig(**fields)
    assert "\n" not in str(e.value)


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))


class SurfaceFamily(Family):
    """Writes w (θneon's p, with θr: p=0 and θs: p=-1), the guidance scale and the step count into the pixels,
    so that a metric can read them back and report a chosen FID surface."""
    name = "surface"
    train_defaults = TrainDefaults()
    SAMPLER_ARGS = (Arg("cfg", float, 0.0, "guidance scale"), Arg("steps", int, 1, "step count"))

    def sample(self, bundle, seeds, labels, cfg=0.0, steps=1, **_):
        pixels = [round(bundle.net.p.item() * 20) + 50, round(cfg * 20), steps]
        return torch.tensor(pixels, dtype=torch.uint8).expand(len(seeds), 1, 1, 3).clone()


class SurfaceMetric:
    def __init__(self, surface):
        self.surface, self.point = surface, None

    def __call__(self):
        return self

    def update(self, images, seeds, labels=None):
        w20, c20, steps = images[0, 0, 0].tolist()
        self.point = ((w20 - 50) / 20, c20 / 20, steps)

    def finish(self):
        return {"fid": self.surface(*self.point)}


def _surface_sweep(cfg: SweepConfig, surface, path) -> Sweep:
    small = dataclasses.replace(cfg, num_images=2, per_class=None, batch=2, sampler={})
    return neon_sweep(SurfaceFamily(), Bundle(net=OneWeight()), {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)},
                      small, SurfaceMetric(surface), str(path))


def test_sweep_run_walks_the_official_search_and_records_the_order(tmp_path):
    cfg = sweep_section("var_d16_256")
    (_, w_values, cfg_values), = setting_grids(cfg)
    f = bowl(0.55, 1.47, 1.0, 2.0)       # off-grid minimum: the moving refinement visits new points
    script = var_script(f, w_values, cfg_values, refine=True)
    best = _surface_sweep(cfg, lambda w, c, steps: f(w, c), tmp_path / "sweep.json").run()
    first_visits = list(dict.fromkeys(script.visits))
    doc = json.loads((tmp_path / "sweep.json").read_text())
    replayed = [(p["w"], p["cfg"]) for p in sorted(doc["points"], key=lambda p: p["order"])]
    assert replayed == first_visits and [p["order"] for p in doc["points"]] != sorted(p["order"] for p in doc["points"])
    assert (best["w"], best["cfg"], best["fid"]) == script.best == (doc["best"]["w"], doc["best"]["cfg"],
                                                                      doc["best"]["fid"])


def test_sweep_gives_each_setting_its_own_grid_and_best(tmp_path):
    cfg = sweep_section("imm_in256")
    surface = lambda w, c, steps: round(2 + (w - 0.5 * steps) ** 2 + (c - 1.7) ** 2, 4) + 1e-7   # noqa: E731
    sweep = _surface_sweep(cfg, surface, tmp_path / "sweep.json")
    overall = sweep.run()
    for setting, w_values, cfg_values in setting_grids(cfg):
        f = lambda w, c, s=setting["steps"]: surface(w, c, s)   # noqa: E731
        script = imm_script(f, w_values, cfg_values)
        mine = sorted((p for p in sweep.points.values() if p["setting"] == setting), key=lambda p: p["order"])
        assert [(p["w"], p["cfg"]) for p in mine] == script.visits
        best = sweep.best(setting)
        assert (best["w"], best["cfg"], best["fid"]) == script.best
    assert overall == min((sweep.best(s) for s, _, _ in setting_grids(cfg)), key=lambda p: p["fid"])


def test_a_resumed_official_sweep_walks_the_same_points_without_recomputing(tmp_path):
    cfg = sweep_section("xar_b_256")
    f = bowl(1.9, 3.55, 0.5, 0.5)
    first = _surface_sweep(cfg, lambda w, c, steps: f(w, c), tmp_path / "sweep.json")
    best = first.run()
    again = _surface_sweep(cfg, lambda w, c, steps: pytest.fail("a saved point was computed again"),
                           tmp_path / "sweep.json")
    assert again.run() == best
    assert {k: p["order"] for k, p in again.points.items()} == {k: p["order"] for k, p in first.points.items()}


class AdherenceMetric(SurfaceMetric):
    """FID falls as w grows, and so does the CLIP score: 30 − 4·w (θr: 30)."""
    def finish(self):
        w = self.point[0]
        return {"fid": self.surface(*self.point), "clip_score": 30.0 - 4.0 * w}


@pytest.mark.parametrize("search", ["grid", "official"])
def test_clip_drop_keeps_the_chosen_point_within_its_prompt_adherence(tmp_path, search):
    extra = {"stop": "previous"} if search == "official" else {}
    cfg = SweepConfig(w=[0.5, 1.0, 1.5, 2.0, 2.5], search=search, tolerance=None, num_images=2, batch=2, **extra)
    surface = lambda w, c, steps: 10.0 - w   # noqa: E731  (the objective alone would take w = 2.5)
    free = neon_sweep(SurfaceFamily(), Bundle(net=OneWeight()), {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)},
                      cfg, AdherenceMetric(surface), str(tmp_path / "free.json")).run()
    assert free["w"] == 2.5
    kept = neon_sweep(SurfaceFamily(), Bundle(net=OneWeight()), {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)},
                      dataclasses.replace(cfg, clip_drop=6.0), AdherenceMetric(surface), str(tmp_path / "kept.json"))
    best = kept.run()
    assert best["w"] == 1.5 and best["clip_drop"] == 6.0   # 30 − 24: the largest w losing at most 6
    doc = json.loads((tmp_path / "kept.json").read_text())
    assert doc["best"]["w"] == 1.5 and any(p["w"] == 0 for p in doc["points"])   # θr measured as the reference
    strict = neon_sweep(SurfaceFamily(), Bundle(net=OneWeight()), {"p": torch.tensor(0.0)}, {"p": torch.tensor(-1.0)},
                        dataclasses.replace(cfg, clip_drop=0.0), AdherenceMetric(surface), str(tmp_path / "none.json"))
    assert strict.run()["w"] == 0   # every w > 0 loses adherence: θr stays


def test_clip_drop_needs_the_clip_score_and_a_grid_search():
    from neon.config import ConfigError
    with pytest.raises(ConfigError, match="sweep.clip_drop: not used by search: adaptive"):
        SweepConfig(w=[0.0, 1.0], search="adaptive", clip_drop=1.0)
    with pytest.raises(ConfigError, match="sweep.clip_drop: a CLIP-score drop of 0 or more"):
        SweepConfig(w=[0.0, 1.0], search="grid", clip_drop=-1.0)
