"""The baselines Neon must beat (config `baselines:`), computed in the same run on the same seeds: θr's guidance
re-tuned on the sweep's grid, θr fine-tuned as long again, θs as a sampling-time guide of θr and of θneon."""
import dataclasses
import json
import os

import pytest
import torch

from neon import dist
from neon import score as points
from neon.baselines import _Context, _sweep_config
from neon.checkpoint import load_state_dict
from neon.config import ConfigError, parse_config
from neon.family import Arg
from neon.guidance import GUIDE_SCALE, active_guide, mix, with_guide
from neon.run import _run
from neon.score import Scorer
from neon.search import grid_search
from neon.sweep import Sweep, setting_grids
from neon.testing import SIGMAS, TinyPixFamily


class GuidedPix(TinyPixFamily):
    """tinypix with a guidance scale `cfg` (out = D + (cfg − 1)·(D − x), away from the noisy input) and a guide
    network, mixed after each network's cfg as the real families do."""
    name = "guidedpix"
    SAMPLER_ARGS = TinyPixFamily.SAMPLER_ARGS + (Arg("cfg", float, 1.0, "guidance scale"), GUIDE_SCALE)

    @torch.no_grad()
    def sample(self, bundle, seeds, labels=None, num_steps: int = 4, cfg: float = 1.0, guide_scale: float = 0.0):
        guide = active_guide(bundle, guide_scale)
        r = bundle.resolution
        x = torch.stack([torch.randn(3, r, r, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        x = x * SIGMAS[0]
        sigmas = list(SIGMAS[:num_steps]) + [0.0]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            s = torch.full((x.shape[0],), sigma)
            out = self._guided(bundle.net, x, s, labels, cfg)
            if guide is not None:
                out = mix(out, self._guided(guide, x, s, labels, cfg), guide_scale)
            x = out + (x - out) * (sigma_next / sigma)
        return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    @staticmethod
    def _guided(net, x, sigma, labels, cfg):
        D = net(x, sigma, labels)
        return D + (cfg - 1) * (D - x)


BASE = {
    "family": "guidedpix",
    "metrics": {"detector": "inception-v3-compat", "weights": "fid-helper", "inception_score": False},
    "synthetic": {"num_images": 8, "labels": "none", "batch": 8, "sampler": {"num_steps": 2}},
    "finetune": {"lr": 1e-3, "batch": 4, "total_images": 8, "snapshot_every_images": 4, "log_every_images": 4},
    "sweep": {"w": [0.0, 1.0], "cfg": [1.0, 1.5], "num_images": 4, "batch": 4, "seed_offset": 100, "search": "grid",
              "sampler": {"num_steps": 2}, "snapshot": "all"},
    "final": {"num_images": 4, "batch": 4, "seed_offset": 1000, "sampler": {"num_steps": 2},
              "base_sampler": {"num_steps": 2, "cfg": 1.0}},
    "baselines": {"guidance_retune": True, "continued_finetune": {"real_data": None},
                  "self_guidance": {"omega": [0.0, 0.5]}, "neon_guidance": {"omega": [0.0, 0.5]}},
}


def _run_config(data: dict, out) -> dict:
    cfg = parse_config(data, smoke=True)
    os.makedirs(out, exist_ok=True)
    return _run(GuidedPix(), cfg, str(out), True, dist.init(), "guided.yaml")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One run with every baseline on: (its folder, run.json's document)."""
    out = tmp_path_factory.mktemp("baselines") / "run"
    return out, _run_config(BASE, out)


def _sweep_points(path) -> list[dict]:
    with open(path) as f:
        return json.load(f)["points"]


def test_run_json_holds_every_baseline_with_its_chosen_point_and_final_metrics(full_run):
    out, doc = full_run
    baselines = json.loads((out / "run.json").read_text())["stages"]["baselines"]
    assert list(baselines) == ["guidance_retune", "continued_finetune", "self_guidance", "neon_guidance"]
    for name, b in baselines.items():
        assert {"w", "cfg", "setting"} <= set(b["point"]), name
        final = b["final"]
        assert final["fid"] is not None and final["num_images"] == BASE["final"]["num_images"], name
        assert final["seeds"] == doc["stages"]["final"]["neon"]["seeds"], name   # the same final seeds as θneon
    assert baselines["continued_finetune"]["point"]["w"] == -1.0
    for name in ("self_guidance", "neon_guidance"):
        assert baselines[name]["point"]["omega"] in BASE["baselines"][name]["omega"]
        assert baselines[name]["cost"]["network_evaluations_vs_neon"] == (1.0 if baselines[name]["point"]["omega"]
                                                                          == 0 else 2.0)
        assert baselines[name]["cost"]["seconds"] >= 0


def test_guidance_retune_visits_exactly_the_w_zero_points_of_neons_grid(full_run):
    out, _ = full_run
    retune = _sweep_points(out / "baselines" / "guidance_retune-sweep.json")
    neon_grid = {(0.0, g) for g in BASE["sweep"]["cfg"]}
    assert {(p["w"], p["cfg"]) for p in retune} == neon_grid
    # and each is θr's point of Neon's own sweep: same weights, seeds and sampler, so the same FID
    neon = {(p["w"], p["cfg"]): p["fid"] for p in _sweep_points(out / "sweep" / "snapshot-0000000008.json")}
    assert {(p["w"], p["cfg"]): p["fid"] for p in retune} == {k: neon[k] for k in neon_grid}


def test_omega_zero_in_self_guidance_gives_theta_rs_images_and_metric(full_run):
    out, doc = full_run
    cfg = parse_config(BASE, smoke=True)
    family = GuidedPix()
    bundle = family.tiny(seed=0)                        # the run's θr
    theta_s = load_state_dict(doc["stages"]["sweep"]["theta_s"])
    guided = with_guide(bundle, theta_s)
    args = points.guided(None, cfg.sweep.cfg_key)(0.0, 1.5, {}, cfg.sweep.sampler).sampler
    assert args["guide_scale"] == 0.0
    seeds = list(range(100, 104))
    assert torch.equal(family.sample(guided, seeds, **args), family.sample(bundle, seeds, num_steps=2, cfg=1.5))
    neon = {(p["w"], p["cfg"]): p["fid"] for p in _sweep_points(out / "sweep" / "snapshot-0000000008.json")}
    guide = {(p["w"], p["cfg"]): p["fid"] for p in _sweep_points(out / "baselines" / "self_guidance-sweep.json")}
    assert {g: guide[(0.0, g)] for g in BASE["sweep"]["cfg"]} == {g: neon[(0.0, g)] for g in BASE["sweep"]["cfg"]}


def test_a_guide_sweep_walks_omega_where_the_sweep_walks_w():
    cfg = parse_config(BASE, smoke=True)
    ctx = _Context(None, cfg, "", 0, {}, {})
    (setting, omega, guidance), = setting_grids(_sweep_config(ctx, [0.0, 0.5]))
    assert (setting, omega, guidance) == ({}, [0.0, 0.5], BASE["sweep"]["cfg"])
    visited = []
    grid_search(lambda w, g: visited.append((w, g)) or 1.0, omega, guidance)
    assert visited == [(w, g) for g in guidance for w in omega]


def test_continued_finetune_on_s_trains_twice_the_self_training_images(full_run):
    out, doc = full_run
    b = doc["stages"]["baselines"]["continued_finetune"]
    total = BASE["finetune"]["total_images"]
    assert b["data"] == "synthetic" and b["train_images"] == b["trained_images"] == 2 * total
    log_file = out / "baselines" / "continued_finetune" / "log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert log[0]["images"] > total            # continued from θs's saved state, not from θr
    assert os.path.basename(b["checkpoint"]) == f"snapshot-{2 * total:010d}.pth"


def test_continued_finetune_on_real_data_trains_the_configured_images(tmp_path, full_run):
    out, _ = full_run
    data = {**BASE, "baselines": {"continued_finetune": {"real_data": str(out / "synthetic.npz")}}}
    doc = _run_config(data, tmp_path / "real")
    b = doc["stages"]["baselines"]["continued_finetune"]
    assert b["data"] == "real" and b["trained_images"] == BASE["finetune"]["total_images"]
    assert list(doc["stages"]["baselines"]) == ["continued_finetune"]


def test_a_rerun_skips_finished_baselines(full_run, capsys):
    out, doc = full_run
    files = sorted((out / "baselines").glob("*.json"))
    before = {f.name: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    again = _run_config(BASE, out)
    printed = capsys.readouterr().out
    assert "stage " not in printed   # no stage begun: no baseline computed again (the summary still lists them)
    assert {f.name: f.stat().st_mtime_ns for f in files} == before
    strip = lambda d: {k: {**v, "final": {**v["final"], "seconds": 0}} for k, v in d.items()}  # noqa: E731
    assert strip(again["stages"]["baselines"]) == strip(doc["stages"]["baselines"])


def test_plots_and_model_card_show_the_baselines_beside_neon(full_run):
    out, _ = full_run
    assert (out / "baselines_sweep.png").stat().st_size > 0 and (out / "baselines_final.png").stat().st_size > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Baselines" in card
    for name in ("θneon", "guidance_retune", "continued_finetune", "self_guidance", "neon_guidance"):
        assert f"| {name} |" in card, name


def test_baselines_are_off_by_default():
    assert parse_config({k: v for k, v in BASE.items() if k != "baselines"}, smoke=True).baselines.enabled() == []


def test_guidance_retune_without_a_guidance_grid_is_refused_in_one_line():
    data = {**BASE, "sweep": {**BASE["sweep"], "cfg": None}, "baselines": {"guidance_retune": True}}
    with pytest.raises(ConfigError, match=r"^baselines\.guidance_retune: the sweep has no guidance grid"):
        parse_config(data, smoke=True)


def test_an_empty_omega_list_and_a_missing_real_data_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^baselines\.self_guidance\.omega: at least one"):
        parse_config({**BASE, "baselines": {"self_guidance": {"omega": []}}}, smoke=True)
    missing = str(tmp_path / "real.npz")
    with pytest.raises(ConfigError, match=r"^baselines\.continued_finetune\.real_data: .* not found"):
        parse_config({**BASE, "baselines": {"continued_finetune": {"real_data": missing}}}, smoke=True)


def test_a_guide_baseline_on_a_family_without_guide_scale_is_refused():
    from neon.config import check_family_args
    cfg = parse_config({**BASE, "family": "tinypix", "sweep": {**BASE["sweep"], "cfg": None},
                        "final": {**BASE["final"], "base_sampler": None},
                        "baselines": {"self_guidance": {"omega": [1.0]}}}, smoke=True)
    with pytest.raises(ConfigError, match=r"^baselines\.self_guidance: the tinypix sampler takes no guide"):
        check_family_args(dataclasses.replace(cfg), TinyPixFamily(), smoke=True)


def test_guidance_retune_refinement_stays_at_w_zero_with_the_official_search(monkeypatch):
    """With the official 3x3 refinement (moving centre) the walk asks for neighbours off w = 0; each is θr's point
    at that guidance scale, so the chosen point has w = 0 and θr's weights were sampled at every point."""
    from neon import score as score_module
    family = GuidedPix()
    bundle = family.tiny(seed=0)
    theta_r = {k: v.clone() for k, v in bundle.net.state_dict().items()}
    sampled = []

    def fake_evaluate(family, bundle, metric, num_images, per_class, seed_offset, batch, args, desc="", classes=None):
        sampled.append((args["cfg"], all(torch.equal(v, theta_r[k]) for k, v in bundle.net.state_dict().items())))
        return {"fid": (args["cfg"] - 1.7) ** 2}          # lowest just off the grid: the refinement moves
    monkeypatch.setattr(score_module, "evaluate_images", fake_evaluate)
    data = {**BASE, "sweep": {**BASE["sweep"], "w": [0.5, 1.0], "cfg": [1.0, 1.5, 2.0], "search": "official",
                              "tolerance": 0.5, "stop": "previous", "refine": 0.1, "refine_pattern": "3x3",
                              "refine_centre": "moving", "refine_decimals": 1}}
    cfg = parse_config(data, smoke=True)
    ctx = _Context(Scorer(family, bundle, None, theta_r), cfg, "", 0, {}, {})
    retune = Sweep(ctx.scorer, points.base_only(cfg.sweep.cfg_key), _sweep_config(ctx, [0.0]))
    best = retune.run()
    assert {p["w"] for p in retune.points.values()} == {0.0}
    assert best["w"] == 0.0 and best["fid"] == min(p["fid"] for p in retune.points.values())
    assert max(c for c, _ in sampled) > 2.0 - 1e-9 and any(c not in (1.0, 1.5, 2.0) for c, _ in sampled)  # refined
    assert all(same for _, same in sampled)


@pytest.mark.parametrize("name, expected", [
    ("var_d16_256", ["guidance_retune", "continued_finetune", "self_guidance", "neon_guidance"]),
    ("edm_cifar10_cond", ["continued_finetune", "self_guidance", "neon_guidance"])])
def test_a_guided_and_an_unguided_smoke_run_turn_on_every_baseline_that_applies(name, expected):
    from neon.config import load_config
    config = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml")
    assert load_config(config, smoke=True).baselines.enabled() == expected
    assert load_config(config).baselines.enabled() == []          # the paper row itself: off, as a comment shows
