"""The baselines Neon must beat, in the same run, on the same sweep and final seeds (config section `baselines:`).

- `guidance_retune`: θr alone (w = 0) over exactly the guidance grid Neon's sweep walks, with the same search
  rules: is Neon's gain more than re-tuning θr's guidance scale?
- `continued_finetune`: θr fine-tuned with the finetune section's recipe on real data, or, without real data,
  θs's own training on S continued for as many images again (twice the images in all), evaluated as it is
  (w = −1, the fine-tuned model itself) at θr's sampler settings: is Neon more than training longer?
- `self_guidance`: θr sampled with the best snapshot's θs as a guide (SIMS / autoguidance, neon/guidance.py),
  out = (1+ω)·out_θr − ω·out_θs at every network evaluation; ω swept as w is (with the guidance grid too).
- `neon_guidance`: θneon (the chosen merge) sampled with θs as a guide, ω swept the same way: do they add up?

Each baseline's sweep points are saved as they finish (`baselines/<name>-sweep.json`, neon.sweep.Sweep), its
result once its final evaluation is done (`baselines/<name>.json`), so a rerun skips finished baselines and
resumes an unfinished one at its last point. run.json records them under the stage "baselines".
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from neon import dist
from neon.checkpoint import atomic_open, load_state_dict
from neon.config import OBJECTIVE_LABELS, RunConfig, metric_digits, objective_key
from neon.errors import NeonError
from neon.family import Bundle, Family
from neon.guidance import GUIDE_SCALE, with_guide
from neon.merge import merge_state_dicts
from neon.snapshot_sweep import final_result
from neon.sweep import Sweep

FOLDER = "baselines"
GUIDED = ("self_guidance", "neon_guidance")   # the baselines that sample with θs as a guide


class RetuneSweep(Sweep):
    """θr alone over the sweep's guidance grid: w is fixed at 0, so a point off w = 0 that the search asks for
    (a refinement neighbour along w) is θr's point at that guidance scale."""

    def evaluate(self, w: float, guidance: float | None, setting: dict | None = None) -> dict:
        return super().evaluate(0.0, guidance, setting)

    def save(self, plot: bool = False) -> None:
        super().save(plot=False)   # FID vs w says nothing at one w: baselines_sweep.png draws the re-tune


class GuideSweep(Sweep):
    """The sweep with ω (guide_scale) in w's place: the sampled weights are fixed (θr, or θneon), the bundle's
    guide is θs, and the point (ω, cfg, setting) samples with guide_scale = ω. Points record ω as 'w'."""

    def __init__(self, family: Family, bundle: Bundle, weights: dict, theta_s: dict, cfg, metric, path: str):
        super().__init__(family, bundle, weights, theta_s, cfg, metric, path)
        self.omega = 0.0

    def merged(self, w: float) -> dict:
        return self.theta_r       # the sampled network is the same at every ω

    def evaluate(self, w: float, guidance: float | None, setting: dict | None = None) -> dict:
        self.omega = w
        return super().evaluate(w, guidance, setting)

    def sampler_args(self, guidance: float | None, setting: dict, base: dict | None = None) -> dict:
        return {**super().sampler_args(guidance, setting, base), GUIDE_SCALE.name: self.omega}

    def save(self, plot: bool = False) -> None:
        super().save(plot=False)   # its axis would read "merge weight w": baselines_sweep.png draws ω


@dataclasses.dataclass
class _Context:
    family: Family
    bundle: Bundle
    theta_r: dict
    cfg: RunConfig
    metric: object
    out: str
    offset: int
    swept: dict           # run.json's "sweep" stage
    final: dict           # run.json's "final" stage

    def path(self, name: str) -> str:
        return os.path.join(self.out, FOLDER, name)

    def theta_s(self) -> dict:
        return load_state_dict(self.swept["theta_s"])


def run_baselines(family: Family, bundle: Bundle, theta_r: dict, cfg: RunConfig, metric, rec, out: str,
                  offset: int) -> None:
    """Every baseline the config turns on, each skipped when its result file exists; recorded in `rec`
    (run.json) under "baselines" as each finishes. bundle.net holds θr again on return."""
    names = cfg.baselines.enabled()
    if not names:
        return
    ctx = _Context(family, bundle, theta_r, cfg, metric, out, offset, rec.stage("sweep"), rec.stage("final"))
    os.makedirs(ctx.path(""), exist_ok=True)
    done = {}
    for name in names:
        path = ctx.path(f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                done[name] = json.load(f)
        else:
            if dist.is_main():
                print(f"baseline: {name}" + (" (its points' w is the guide scale ω)" if name in GUIDED else ""))
            done[name] = {"name": name, **BASELINES[name](ctx)}
            if dist.is_main():
                with atomic_open(path, "w") as f:
                    json.dump(done[name], f, indent=1)
            dist.barrier()
        bundle.net.load_state_dict(theta_r)
        if rec.stage("baselines") != done:
            rec.record("baselines", dict(done))
    if dist.is_main():
        plot_baselines(out, rec.doc)


# ---------------------------------------------------------------------------------------------------------
# The four baselines: each returns {'point': the chosen point, 'final': its final evaluation, ...}.

def _sweep_config(ctx: _Context, w: list[float]):
    """The sweep section with `w` in place of every merge-weight list (the guidance grid and search as they are)."""
    s = ctx.cfg.sweep
    return dataclasses.replace(s, w=list(w), per_setting=[dataclasses.replace(g, w=None) for g in s.per_setting])


def _final(ctx: _Context, sweep: Sweep, point: dict, desc: str) -> dict:
    """The chosen point on the final seeds, with the final section's sampler and the point's guidance."""
    if isinstance(sweep, GuideSweep):
        sweep.omega = point["w"]
    sweep.bundle.net.load_state_dict(sweep.merged(point["w"]))
    args = sweep.sampler_args(point["cfg"], point.get("setting", {}), ctx.cfg.final.sampler)
    return final_result(ctx.family, sweep.bundle, ctx.metric, ctx.cfg, ctx.offset, args, desc)   # with its guide


def guidance_retune(ctx: _Context) -> dict:
    sweep = RetuneSweep(ctx.family, ctx.bundle, ctx.theta_r, ctx.theta_r, _sweep_config(ctx, [0.0]), ctx.metric,
                        ctx.path("guidance_retune-sweep.json"))
    point = sweep.run()
    return {"point": _point(point), "final": {"w": 0.0, "cfg": point["cfg"], "setting": point.get("setting", {}),
                                              **_final(ctx, sweep, point, "final guidance_retune")},
            "sweep": sweep.path}


def continued_finetune(ctx: _Context) -> dict:
    """θr trained with the finetune section's recipe: on real data for the same number of images, or on S
    continuing θs's own training (from its saved state) for as many images again."""
    from neon.selftrain import CACHE_FILE, STATE_FILE, encode_examples, finetune, last_log_entry
    ft, real = ctx.cfg.finetune, ctx.cfg.baselines.continued_finetune.real_data
    folder = ctx.path("continued_finetune")
    ctx.bundle.net.load_state_dict(ctx.theta_r)
    if real is None:
        data, cache = os.path.join(ctx.out, "synthetic.npz"), os.path.join(ctx.out, "finetune", CACHE_FILE)
        recipe = dataclasses.replace(ft, total_images=2 * ft.total_images, snapshot_every_images=None)
        state = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(state):
            source = os.path.join(ctx.out, "finetune", STATE_FILE)
            if not os.path.isfile(source):
                raise NeonError(f"baselines.continued_finetune: {source} not found (self-training's last state, "
                                "which the continued training starts from)")
            os.makedirs(folder, exist_ok=True)
            if dist.is_main():
                shutil.copyfile(source, state)
            dist.barrier()
    else:
        from neon.selftrain import check_finetune_data
        check_finetune_data(ctx.family, ctx.bundle, real)
        data, cache = real, os.path.join(folder, CACHE_FILE)
        recipe = dataclasses.replace(ft, snapshot_every_images=None)
    examples = encode_examples(ctx.family, ctx.bundle, data, cache, ctx.cfg.synthetic.batch, ft.cache_dtype)
    snapshots = finetune(ctx.family, ctx.bundle, examples, recipe, folder, desc="continued fine-tuning")
    ctx.bundle.net.load_state_dict(load_state_dict(snapshots[-1]))
    setting = ctx.swept["best"].get("setting", {})
    base = ctx.cfg.final.base_sampler if ctx.cfg.final.base_sampler is not None else ctx.cfg.final.sampler
    args = {**base, **setting}
    result = final_result(ctx.family, ctx.bundle, ctx.metric, ctx.cfg, ctx.offset, args, "final continued_finetune")
    point = {"w": -1.0, "cfg": args.get(ctx.cfg.sweep.cfg_key), "setting": setting}
    log = last_log_entry(folder)
    return {"point": point, "final": {**point, **result}, "checkpoint": snapshots[-1],
            "data": "real" if real else "synthetic", "train_images": recipe.total_images,
            "trained_images": log["images"] if log else None}


def _guided(ctx: _Context, name: str, weights: dict) -> dict:
    """`weights` sampled with θs as the guide, ω swept as w is (same grid of guidance scales, same search)."""
    theta_s = ctx.theta_s()
    guided = with_guide(ctx.bundle, theta_s, f"baselines.{name}: θs")
    sweep = GuideSweep(ctx.family, guided, weights, theta_s, _sweep_config(ctx, getattr(ctx.cfg.baselines,
                                                                                          name).omega),
                       ctx.metric, ctx.path(f"{name}-sweep.json"))
    point = sweep.run()
    final = _final(ctx, sweep, point, f"final {name}")
    neon = ctx.final["neon"]
    cost = {"network_evaluations_vs_neon": 1.0 if point["w"] == 0 else 2.0,   # a guide doubles them; ω = 0 skips it
            "seconds": final["seconds"], "neon_seconds": neon.get("seconds")}
    return {"point": {**_point(point), "omega": point["w"]},
            "final": {"omega": point["w"], "w": point["w"], "cfg": point["cfg"],
                      "setting": point.get("setting", {}), **final},
            "cost": cost, "sweep": sweep.path}


def self_guidance(ctx: _Context) -> dict:
    return _guided(ctx, "self_guidance", ctx.theta_r)


def neon_guidance(ctx: _Context) -> dict:
    theta_neon = merge_state_dicts(ctx.theta_r, ctx.theta_s(), ctx.swept["best"]["w"])
    out = _guided(ctx, "neon_guidance", theta_neon)
    return {**out, "neon_w": ctx.swept["best"]["w"]}


def _point(p: dict) -> dict:
    """A chosen sweep point as run.json records it: where it is and what it measured there."""
    return {k: v for k, v in p.items() if k in ("w", "cfg", "setting", "num_images") or k in OBJECTIVE_LABELS}


BASELINES = {"guidance_retune": guidance_retune, "continued_finetune": continued_finetune,
             "self_guidance": self_guidance, "neon_guidance": neon_guidance}


# ---------------------------------------------------------------------------------------------------------
# Pictures and the printed summary.

def final_rows(doc: dict) -> list[tuple[str, dict]]:
    """(label, final result) of θr, θneon and every finished baseline, in that order."""
    final, rows = doc["stages"].get("final") or {}, []
    for label, r in (("θr", final.get("base")), ("θneon", final.get("neon"))):
        if r:
            rows.append((label, r))
    for name, b in (doc["stages"].get("baselines") or {}).items():
        rows.append((name, b["final"]))
    return rows


def plot_baselines(out: str, doc: dict) -> None:
    """baselines_sweep.png (objective vs ω beside Neon's FID vs w) and baselines_final.png (final metrics)."""
    from neon.plot_metrics import plot_final_comparison, plot_guide_sweeps
    cfg_key = doc["config"]["sweep"]["cfg_key"]
    sweeps = {}
    for name, b in (doc["stages"].get("baselines") or {}).items():
        if b.get("sweep") and os.path.isfile(b["sweep"]):
            with open(b["sweep"]) as f:
                sweeps[name] = json.load(f)["points"]
    neon_points = []
    if os.path.isfile(os.path.join(out, "sweep.json")):
        with open(os.path.join(out, "sweep.json")) as f:
            neon_points = json.load(f)["points"]
    neon_w = ((doc["stages"].get("sweep") or {}).get("best") or {}).get("w")
    key = objective_key(doc["config"]["sweep"].get("objective", "fid"))
    plot_guide_sweeps(neon_points, sweeps, os.path.join(out, "baselines_sweep.png"), cfg_key, neon_w, key)
    plot_final_comparison(final_rows(doc), os.path.join(out, "baselines_final.png"), key)


def summary_lines(doc: dict, cfg_key: str) -> list[str]:
    """One printed line per finished baseline: its chosen point and its final value of the sweep's objective."""
    key, lines = objective_key(doc["config"]["sweep"].get("objective", "fid")), []
    for name, b in (doc["stages"].get("baselines") or {}).items():
        r = b["final"]
        parts = [f"ω={r['omega']:g}" if "omega" in r else f"w={r['w']:g}"]
        parts += [f"{k}={v}" for k, v in sorted(r.get("setting", {}).items())]
        parts += [] if r.get("cfg") is None else [f"{cfg_key}={r['cfg']:g}"]
        cost = b.get("cost")
        extra = f" ({cost['network_evaluations_vs_neon']:g}× Neon's network evaluations)" if cost else ""
        lines.append(f"{name}: {' '.join(parts)}  {OBJECTIVE_LABELS[key]} {r[key]:.{metric_digits(key)}f} "
                     f"on {r['num_images']} images{extra}")
    return lines

