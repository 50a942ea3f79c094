"""Stage 3 — choose the merge weight: the objective (`sweep.objective`: FID, FD_DINOv2 or KID) of
θneon(w) = (1+w)·θr − w·θs over a grid of w (× guidance scale).

How the grid is walked is `sweep.search` (neon/search.py): 'grid' (per guidance scale, increasing w, early stop
against the best, a ±refine cross) or 'official' (the paper's protocol as the official scripts run it). Each
point merges in memory, samples `num_images` images with fixed seeds (the same noise for every w, so differences
between points are not sampling noise) and computes every metric asked for (the objective is one of them).
Points are saved as they finish, so a killed sweep resumes; each records the `order` in which the latest walk
first visited it, so the walk can be replayed.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time

import torch

from neon import dist
from neon import score as points
from neon.checkpoint import atomic_open, atomic_path
from neon.config import METRIC_LABELS, OBJECTIVE_LABELS, SweepConfig, format_metric, objective_key
from neon.errors import NeonError
from neon.evaluate import MetricFactory
from neon.family import Bundle, Family
from neon.score import Point, PointAt, Scorer, Seeds, on_device
from neon.search import grid_search, official_search


def neon_sweep(family: Family, bundle: Bundle, theta_r: dict, theta_s: dict, cfg: SweepConfig,
               metric: MetricFactory, path: str | None = None) -> Sweep:
    """Neon's sweep: θneon(w) = (1+w)·θr − w·θs sampled in `bundle`'s network (θr, θs: state dicts)."""
    theta_r = on_device(theta_r, bundle.net.state_dict())
    return Sweep(Scorer(family, bundle, metric, theta_r), points.neon(theta_r, theta_s, cfg.cfg_key), cfg, path)


def state_dict_copy(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `net`'s weights (θr before anything loads merged weights into the network)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _key(w: float, guidance: float | None, setting: dict) -> str:
    return f"{w:.6g}|{guidance if guidance is None else f'{guidance:.6g}'}|{json.dumps(setting, sort_keys=True)}"


def setting_grids(cfg: SweepConfig) -> list[tuple[dict, list[float], list[float] | None]]:
    """(setting, w list, guidance list) for every setting the sweep walks: `per_setting` as given, else every
    combination of the `grid` values (one empty setting when there is no grid), each with the sweep's w and cfg."""
    if cfg.per_setting:
        return [(dict(g.setting), list(cfg.w if g.w is None else g.w), cfg.cfg if g.cfg is None else list(g.cfg))
                for g in cfg.per_setting]
    names = sorted(cfg.grid)
    return [(dict(zip(names, values)), list(cfg.w), cfg.cfg)
            for values in itertools.product(*(cfg.grid[n] for n in names))]


def point_label(w: float | None, guidance: float | None, setting: dict, guidance_key: str,
                guide: bool = False) -> str:
    """'w=1.5 steps=8 cfg=2': a sweep point as the sampler's arguments name it (ω for a guide's scale)."""
    parts = [] if w is None else [f"{'ω' if guide else 'w'}={w:g}"]
    parts += [f"{k}={v}" for k, v in sorted(setting.items())]
    return " ".join(parts + ([] if guidance is None else [f"{guidance_key}={guidance:g}"]))


class Sweep:
    """The points of one walk, each measured through the scorer (neon.score) and saved to `path` as it finishes.
    A point is named by its coordinates (w — or ω for a guide —, guidance scale, setting); `point_at` says what
    is sampled there. A setting is one entry of `per_setting` or one combination of the `grid` sampler arguments
    (the empty dict when there is neither)."""

    def __init__(self, scorer: Scorer, point_at: PointAt, cfg: SweepConfig, path: str | None = None,
                 plot: bool = True):
        """plot: draw `<path stem>.png` (objective vs w) when the walk ends."""
        self.scorer, self.point_at, self.cfg, self.path, self.plot = scorer, point_at, cfg, path, plot
        self.key = objective_key(cfg.objective)   # the result key the search minimises ('fid', 'kid_mean', ...)
        self.grids = setting_grids(cfg)
        self.settings_grid = [setting for setting, _, _ in self.grids]
        self.points: dict[str, dict] = {}
        self.visits = 0                  # points the current walk has visited (the next point's `order`)
        if path and os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("settings") == self.settings():
                # a point saved before a metric was asked for lacks it: computed again, so every point has them all
                needed = set(getattr(scorer.metric, "keys", ())) | {self.key}
                self.points = {_key(p["w"], p["cfg"], p.get("setting", {})): p for p in saved.get("points", [])
                               if needed <= p.keys()}

    def settings(self) -> dict:
        c = self.cfg
        return {"num_images": c.num_images, "per_class": c.per_class, "seed_offset": c.seed_offset,
                "sampler": c.sampler, "cfg_key": c.cfg_key, **({"classes": c.classes} if c.classes else {})}

    def point(self, w: float, guidance: float | None, setting: dict | None = None, base: dict | None = None) -> Point:
        """What is sampled at (w, guidance, setting): with the sweep's sampler arguments, or `base` (the final
        evaluation's)."""
        return self.point_at(w, guidance, setting or {}, self.cfg.sampler if base is None else base)

    def evaluate(self, w: float, guidance: float | None, setting: dict | None = None) -> dict:
        """The point (w, guidance, setting): computed and saved unless already known. Its `order` is set on the
        first visit of the current walk, whether it was computed now or found in the saved sweep."""
        point = self.point(w, guidance, setting)
        at = point.at
        key = _key(at["w"], at["cfg"], at["setting"])
        computed = key not in self.points
        if computed:
            t0 = time.time()
            label = point_label(at["w"], at["cfg"], at["setting"], self.cfg.cfg_key, "omega" in at)
            c = self.cfg
            seeds = Seeds(c.num_images, c.per_class, c.seed_offset, c.batch, c.classes)
            result = self.scorer.score(point, seeds, desc=label)
            if result.get(self.key) is None:
                raise NeonError(f"sweep.objective: the metric gave no {self.key!r} (it gave {', '.join(result)})")
            self.points[key] = {**at, **result, "seconds": round(time.time() - t0, 2)}
            if dist.is_main():
                print(f"{label}: {metrics_label(result, self.key)}")
        point = self.points[key]
        if "order" not in point:
            point["order"] = self.visits
            self.visits += 1
        if computed:
            self.save()
        return point

    def adheres(self, point: dict) -> bool:
        """Whether `point` keeps the prompt adherence `clip_drop` asks for: its CLIP score at most that far below
        θr's (w = 0, same guidance and setting, same seeds; measured here if the walk has not). Always true without
        clip_drop, and for θr itself. Records `clip_drop` (θr's score minus the point's) on the point."""
        if self.cfg.clip_drop is None or point["w"] == 0:
            return True
        base = self.evaluate(0.0, point["cfg"], point.get("setting") or {})
        point["clip_drop"] = round(base["clip_score"] - point["clip_score"], 6)
        return point["clip_drop"] <= self.cfg.clip_drop

    def best(self, setting: dict | None = None) -> dict:
        """The point with the lowest objective (of one setting, or of all) among those the latest walk visited (all
        points when none carries an `order`) that keep the prompt adherence asked for (`adheres`); a tie goes to
        the point visited first, as in the search."""
        points = [p for p in self.points.values() if setting is None or p.get("setting", {}) == setting]
        visited = [p for p in points if "order" in p]
        kept = [p for p in visited or points if self.adheres(p)]
        if not kept:   # every point lost too much adherence: θr (w = 0, which `adheres` measured) stays
            kept = [p for p in self.points.values()
                    if p["w"] == 0 and (setting is None or p.get("setting", {}) == setting)]
        return min(kept, key=lambda p: (p[self.key], p.get("order", math.inf)))

    def run(self) -> dict:
        """For every setting, walk its grid with the configured search. Returns the best point of all (the
        lowest objective; a tie goes to the earlier setting)."""
        for p in self.points.values():
            p.pop("order", None)         # `order` describes the latest walk only
        self.visits = 0
        c, found = self.cfg, []
        for setting, w, guidance in self.grids:
            def objective(w_i, g, setting=setting):
                point = self.evaluate(w_i, g, setting)
                return point[self.key] if self.adheres(point) else math.inf   # kept out, as a worse point
            if c.search == "official":
                b_w, b_g, _ = official_search(objective, w, guidance, c.tolerance, c.stop, c.refine,
                                              c.refine_pattern, c.refine_centre, c.refine_decimals)
            else:
                b_w, b_g, _ = grid_search(objective, w, guidance, c.tolerance, c.refine)
            point = self.evaluate(b_w, b_g, setting)   # known by now: evaluate only looks it up
            found.append(point if self.adheres(point) else self.best(setting))   # every w lost adherence: θr
        self.save(plot=self.plot)
        return min(found, key=lambda p: p[self.key] if self.adheres(p) else math.inf)

    def save(self, plot: bool = False) -> None:
        if not self.path or not dist.is_main():
            return
        points = sorted(self.points.values(),
                        key=lambda p: (json.dumps(p.get("setting", {}), sort_keys=True), p["cfg"] or 0, p["w"]))
        doc = {"settings": self.settings(), "points": points, "best": self.best() if points else None}
        if len(self.settings_grid) > 1 and points:
            doc["best_per_setting"] = [self.best(s) for s in self.settings_grid
                                       if any(p.get("setting", {}) == s for p in points)]
        with atomic_open(self.path, "w") as f:
            json.dump(doc, f, indent=1)
        if plot and points:
            plot_sweep(points, os.path.splitext(self.path)[0] + ".png", self.cfg.cfg_key, self.key)
            from neon.plot_metrics import plot_sweep_metrics  # every metric recorded, one figure each
            plot_sweep_metrics(points, self.path, self.cfg.cfg_key)


def metrics_label(result: dict, key: str = "fid") -> str:
    """'FID 12.3456  KID 0.012345' of a result: the objective `key` first, then the other recorded metrics, each
    ± its std over seed ranges where the result holds one (neon.repeats.combine_ranges)."""
    keys = [key] + [k for k in METRIC_LABELS if k != key and result.get(k) is not None]
    std = result.get("std") or {}
    label = "  ".join(f"{METRIC_LABELS[k]} {format_metric(k, result[k])}"
                      + ("" if std.get(k) is None else f" ± {format_metric(k, std[k])}") for k in keys)
    return label + (f" (covariance {result['covariance']})" if result.get("covariance") else "")


def plot_sweep(points: list[dict], path: str, cfg_key: str = "cfg", key: str = "fid") -> None:
    """The objective `key` (FID, FD_DINOv2 or KID's mean) vs w, one curve per guidance scale, the best point
    starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    curves = {}
    for p in points:
        curves.setdefault((json.dumps(p.get("setting", {}), sort_keys=True), p["cfg"]), []).append(p)
    for (setting, c), pts in sorted(curves.items(), key=lambda kv: (kv[0][0], -math.inf if kv[0][1] is None
                                                                    else kv[0][1])):
        pts = sorted(pts, key=lambda p: p["w"])
        ax.plot([p["w"] for p in pts], [p[key] for p in pts], "o-", ms=3,
                label=point_label(None, c, json.loads(setting), cfg_key) or "θneon")
    best = min(points, key=lambda p: p[key])
    ax.plot([best["w"]], [best[key]], "*", ms=14, color="k", label=f"best: w = {best['w']:g}")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("merge weight w   (θneon = (1+w)·θr − w·θs)")
    ax.set_ylabel(f"{OBJECTIVE_LABELS[key]} ({best.get('num_images', '?')} images; lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
