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
from neon import score as points
from neon.checkpoint import atomic_open, load_state_dict
from neon.config import OBJECTIVE_LABELS, RunConfig, format_metric, objective_key
from neon.errors import NeonError
from neon.guidance import with_guide
from neon.merge import merge_state_dicts
from neon.score import Point, Scorer
from neon.snapshot_sweep import final_result, point_final
from neon.sweep import Sweep

FOLDER = "baselines"
GUIDED = ("self_guidance", "neon_guidance")   # the baselines that sample with θs as a guide


@dataclasses.dataclass
class _Context:
    scorer: Scorer        # θr's network and the metric (neon/score.py)
    cfg: RunConfig
    out: str
    offset: int
    swept: dict           # run.json's "sweep" stage
    final: dict           # run.json's "final" stage

    def path(self, name: str) -> str:
        return os.path.join(self.out, FOLDER, name)

    def theta_s(self) -> dict:
        return load_state_dict(self.swept["theta_s"], bool(self.cfg.load_args.get("trust_architecture")))


def run_baselines(scorer: Scorer, cfg: RunConfig, rec, out: str, offset: int, step=None) -> None:
    """Every baseline the config turns on, each skipped when its result file exists; recorded in `rec`
    (run.json) under "baselines" as each finishes. step(k, what): announces the run's stage k (baselines are
    stages 5, 6, ...)."""
    names = cfg.baselines.enabled()
    if not names:
        return
    ctx = _Context(scorer, cfg, out, offset, rec.stage("sweep"), rec.stage("final"))
    os.makedirs(ctx.path(""), exist_ok=True)
    done = {}
    for k, name in enumerate(names, start=5):
        path = ctx.path(f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                done[name] = json.load(f)
        else:
            what = f"baseline {name}" + (" (its points' w is the guide scale ω)" if name in GUIDED else "")
            if step is not None:
                step(k, what)
            elif dist.is_main():
                print(what)
            done[name] = {"name": name, **BASELINES[name](ctx)}
            if dist.is_main():
                with atomic_open(path, "w") as f:
                    json.dump(done[name], f, indent=1)
            dist.barrier()
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


def guidance_retune(ctx: _Context) -> dict:
    sweep = Sweep(ctx.scorer, points.base_only(ctx.cfg.sweep.cfg_key), _sweep_config(ctx, [0.0]),
                  ctx.path("guidance_retune-sweep.json"), plot=False)   # baselines_sweep.png draws the re-tune
    point = sweep.run()
    return {"point": _point(point), "final": point_final(sweep, ctx.cfg, point, ctx.offset, "final guidance_retune"),
            "sweep": sweep.path}


def continued_finetune(ctx: _Context) -> dict:
    """θr trained with the finetune section's recipe: on real data for the same number of images, or on S
    continuing θs's own training (from its saved state) for as many images again."""
    from neon.selftrain import CACHE_FILE, STATE_FILE, encode_examples, finetune, last_log_entry
    ft, real = ctx.cfg.finetune, ctx.cfg.baselines.continued_finetune.real_data
    folder, family, bundle = ctx.path("continued_finetune"), ctx.scorer.family, ctx.scorer.bundle
    if real is None:
        data, cache = os.path.join(ctx.out, "synthetic.npz"), os.path.join(ctx.out, "finetune", CACHE_FILE)
        recipe = dataclasses.replace(ft, total_images=2 * ft.total_images, snapshot_every_images=None,
                                     snapshot_ticks=None, tick_images=None)
        state, source = os.path.join(folder, STATE_FILE), os.path.join(ctx.out, "finetune", STATE_FILE)
        if not os.path.isfile(state) and not os.path.isfile(source):
            raise NeonError(f"baselines.continued_finetune: {source} not found (self-training's last state, "
                            "which the continued training starts from)")
        # Rank 0 decides and copies (atomically: a rank never reads half a file), then every rank meets.
        if dist.is_main() and not os.path.isfile(state):
            os.makedirs(folder, exist_ok=True)
            with open(source, "rb") as src, atomic_open(state) as dst:   # never through a link at `state`
                shutil.copyfileobj(src, dst, 16 << 20)
        dist.barrier()
    else:
        from neon.selftrain import check_finetune_data
        check_finetune_data(family, bundle, real)
        data, cache = real, os.path.join(folder, CACHE_FILE)
        recipe = dataclasses.replace(ft, snapshot_every_images=None, snapshot_ticks=None, tick_images=None)
    examples = encode_examples(family, bundle, data, cache, ctx.cfg.synthetic.batch, ft.cache_dtype)
    snapshots = finetune(family, bundle, examples, recipe, folder, desc="continued fine-tuning")   # on a copy
    theta = load_state_dict(snapshots[-1], bool(ctx.cfg.load_args.get("trust_architecture")))   # read once
    setting = ctx.swept["best"].get("setting", {})
    base = ctx.cfg.final.base_sampler if ctx.cfg.final.base_sampler is not None else ctx.cfg.final.sampler
    args = {**base, **setting}
    point = {"w": -1.0, "cfg": args.get(ctx.cfg.sweep.cfg_key), "setting": setting}
    trained = Point(point, lambda: theta, args)
    result = final_result(ctx.scorer, trained, ctx.cfg, ctx.offset, "final continued_finetune")
    log = last_log_entry(folder)
    return {"point": point, "final": {**point, **result}, "checkpoint": snapshots[-1],
            "data": "real" if real else "synthetic", "train_images": recipe.total_images,
            "trained_images": log["images"] if log else None}


def _guided(ctx: _Context, name: str, weights: dict | None) -> dict:
    """`weights` (None: θr) sampled with θs as the guide, ω swept as w is (same guidance grid, same search)."""
    guided = ctx.scorer.with_bundle(with_guide(ctx.scorer.bundle, ctx.theta_s(), f"baselines.{name}: θs"))
    sweep = Sweep(guided, points.guided(weights, ctx.cfg.sweep.cfg_key),
                  _sweep_config(ctx, getattr(ctx.cfg.baselines, name).omega), ctx.path(f"{name}-sweep.json"),
                  plot=False)   # its axis would read "merge weight w": baselines_sweep.png draws ω
    point = sweep.run()
    final = point_final(sweep, ctx.cfg, point, ctx.offset, f"final {name}")
    neon = ctx.final["neon"]
    cost = {"network_evaluations_vs_neon": 1.0 if point["w"] == 0 else 2.0,   # a guide doubles them; ω = 0 skips it
            "seconds": final["seconds"], "neon_seconds": neon.get("seconds")}
    return {"point": {**_point(point), "omega": point["w"]}, "final": final, "cost": cost, "sweep": sweep.path}


def self_guidance(ctx: _Context) -> dict:
    return _guided(ctx, "self_guidance", None)


def neon_guidance(ctx: _Context) -> dict:
    theta_neon = merge_state_dicts(ctx.scorer.theta_r, ctx.theta_s(), ctx.swept["best"]["w"])
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
        lines.append(f"{name}: {' '.join(parts)}  {OBJECTIVE_LABELS[key]} {format_metric(key, r[key])} "
                     f"on {r['num_images']} images{extra}")
    return lines

