"""Stage 3 with `sweep.search: adaptive`: the walk of neon/adaptive.py over the run's θs snapshots, measured
through the evaluation seam (neon.score.Scorer.holding), then θneon's final evaluation at the chosen point only.

A point's images are the sweep's seeds in order; at n images it has seen the first n. They are sampled in
segments [n_{l−1}, n_l) of the walk's levels n_start, 2·n_start, ... ≤ n_max, and a point's features stay in
memory while it races, so raising n samples only the new segment — and, after a restart, the same segments
again, so every image is the one an uninterrupted run computes, in the same batch, on any number of processes.

Files: `sweep/selection.json` (every measurement in the order the walk asked for it: point, n, objective, its
leave-one-group-out values and std, seconds, images sampled; then the choice), `sweep/<snapshot>.json` (that
snapshot's screening points, the format of neon.sweep.Sweep), `sweep/<chosen snapshot>-final.json`.
"""
from __future__ import annotations

import json
import os
import time

import torch

from neon import dist
from neon import score as points
from neon.adaptive import Adaptive, Estimate, Point, jackknife_std
from neon.checkpoint import atomic_open, load_state_dict
from neon.config import RunConfig, SweepConfig, class_count, objective_key
from neon.errors import NeonError
from neon.metrics.jackknife import frechet_jackknife
from neon.repeats import per_range
from neon.sampling import deal, draw_labels, generate, plan_batches, plan_seeds
from neon.score import Scorer
from neon.snapshot_sweep import images_seen, point_final, snapshot_name
from neon.sweep import Sweep, point_label

PROTOCOL = "adaptive"
THETA_R = "θr"          # the snapshot name of w = 0 points: the same network for every θs


def levels(n_start: int, n_max: int) -> list[int]:
    """n_start, 2·n_start, 4·n_start, ..., n_max: the image counts a point is measured at."""
    out = [n_start]
    while out[-1] < n_max:
        out.append(min(2 * out[-1], n_max))
    return out


def start_images(c, n_max: int) -> int:
    """sweep.start_images, else a sixteenth of the per-point count, at least 4 images per jackknife group."""
    return min(n_max, c.start_images or max(n_max // 16, 4 * c.groups))


def jackknife_groups(c, n_start: int) -> int:
    """sweep.groups, fewer when the screening count is too small for 2 images per group (smoke runs)."""
    return max(2, min(c.groups, (n_start - 2) // 2))


class Measurer:
    """measure(point, n) for the walk: the objective of θneon(w) at (snapshot, w, guidance) on the first n seeds,
    with its jackknife; every measurement logged (and reused on a rerun with the same settings)."""

    def __init__(self, scorer: Scorer, paths: list[str], c: SweepConfig, trust: bool, log_path: str):
        self.scorer, self.paths, self.c, self.trust, self.log_path = scorer, paths, c, trust, log_path
        classes = class_count(c, scorer.bundle.num_classes)   # the sweep's (sweep.classes), else the model's
        self.n_max = c.num_images if not c.per_class else c.per_class * classes
        self.levels = levels(start_images(c, self.n_max), self.n_max)
        self.groups = jackknife_groups(c, self.levels[0])
        self.seeds = plan_seeds(None if c.per_class else c.num_images, c.per_class, classes, c.seed_offset)
        self.labels = draw_labels(scorer.family, scorer.bundle, self.seeds, "per_class" if c.per_class else "random",
                                  classes=c.classes)
        metric = scorer.metric
        key = objective_key(c.objective)
        if key == "fid":
            self.extractor, self.ref = metric.extractor, metric.ref
        elif key == "fd_dinov2" and getattr(metric, "dinov2", None) is not None:
            self.extractor, self.ref = metric.dinov2, metric.dinov2_ref
        else:
            raise NeonError(f"sweep.search: adaptive measures a Fréchet distance (objective fid or fd_dinov2), "
                            f"not {c.objective!r}")
        self.covariance = getattr(metric, "covariance", "unbiased")
        self.features: dict[tuple, torch.Tensor] = {}   # (snapshot name, w, guidance) -> its images' features
        self.theta_s: tuple[int, dict] | None = None
        self.log: list[dict] = []          # this walk's measurements, in the order it asked for them
        self.logged: set[tuple] = set()
        self.known: dict[tuple, dict] = {}
        if os.path.isfile(log_path):
            with open(log_path) as f:
                saved = json.load(f)
            if saved.get("settings") == self.settings():
                self.known = {self._key(e["snapshot"], e["w"], e["cfg"], e["n"]): e for e in saved["evaluations"]}

    def settings(self) -> dict:
        c = self.c
        return {"protocol": PROTOCOL, "levels": self.levels, "groups": self.groups, "z": c.z,
                "indifference": c.indifference, "seed_offset": c.seed_offset, "per_class": c.per_class,
                "sampler": c.sampler, "cfg_key": c.cfg_key, "objective": c.objective, "batch": c.batch}

    @staticmethod
    def _key(snapshot: str, w: float, g: float | None, n: int) -> tuple:
        return snapshot, f"{w:.6g}", None if g is None else f"{g:.6g}", n

    def coordinates(self, p: Point) -> tuple[str, float, float | None]:
        """(snapshot name, w, guidance); at w = 0, θneon = θr whatever θs is: one measurement serves every
        snapshot, named THETA_R."""
        w = sorted(self.c.w)[p.w]
        g = None if p.g is None else sorted(self.c.cfg)[p.g]
        return (THETA_R if w == 0 else snapshot_name(self.paths[p.snapshot])), w, g

    def __call__(self, p: Point, n: int) -> Estimate:
        name, w, g = self.coordinates(p)
        key = self._key(name, w, g, n)
        if key not in self.known:
            self.known[key] = self._measure(p, n, name, w, g)
        entry = self.known[key]
        if key not in self.logged:
            self.logged.add(key)
            self.log.append(entry)
            self.save()             # resumable point by point
        return Estimate(entry["value"], tuple(entry["jackknife"]), n)

    def as_point(self, p: Point, n: int) -> dict:
        """A measured point in the format of neon.sweep.Sweep's points (plus its jackknife std)."""
        name, w, g = self.coordinates(p)
        e = self.known[self._key(name, w, g, n)]
        return {"w": w, "cfg": g, "setting": {}, objective_key(self.c.objective): e["value"],
                "jackknife_std": e["std"], "num_images": n}

    def _measure(self, p: Point, n: int, name: str, w: float, g: float | None) -> dict:
        t0 = time.time()
        have = self.features.get((name, w, g))
        start = 0 if have is None else have.shape[0]
        parts = [] if have is None else [have]
        point = self._point(p, w, g)
        label = f"{name} {point_label(w, g, {}, self.c.cfg_key)} n={n}"
        with self.scorer.holding(point.weights()) as bundle:
            for lo, hi in zip([0] + self.levels, self.levels):   # whole segments, as an uninterrupted walk samples
                if hi <= start or lo >= n:
                    continue
                parts.append(self._features(bundle, lo, hi, point.sampler, label))
        feats = torch.cat(parts)[:n]
        self.features[(name, w, g)] = feats
        value, jack = frechet_jackknife(feats, self.ref.mu, self.ref.sigma, self.groups, self.covariance)
        std = jackknife_std(jack)
        entry = {"snapshot": name, "w": w, "cfg": g, "n": n, "value": value, "std": std, "jackknife": list(jack),
                 "sampled": n - start, "seconds": round(time.time() - t0, 2)}
        if dist.is_main():
            print(f"{label}: {value:.4f} ± {std:.4f}")
        return entry

    def _point(self, p: Point, w: float, g: float | None) -> points.Point:
        if self.theta_s is None or self.theta_s[0] != p.snapshot:
            self.theta_s = (p.snapshot, load_state_dict(self.paths[p.snapshot], self.trust))
        at = points.neon(self.scorer.theta_r, self.theta_s[1], self.c.cfg_key)
        return at(w, g, {}, self.c.sampler)

    def _features(self, bundle, lo: int, hi: int, sampler: dict, label: str) -> torch.Tensor:
        """Features of seeds[lo:hi] (collective: every rank gets all of them, in seed order)."""
        from neon.metrics import FeatureAccumulator
        mine = [lo + i for part in deal(plan_batches(hi - lo, self.c.batch)) for i in part]
        acc = FeatureAccumulator(self.extractor, keep_features=True, logits=False, covariance=self.covariance)
        labels = None if self.labels is None else self.labels[mine]
        for chunk, _, images in generate(self.scorer.family, bundle, [self.seeds[i] for i in mine], labels,
                                         self.c.batch, sampler, label, total=hi - lo):
            acc.update(torch.from_numpy(images), chunk)
        return acc.finish().features

    def save(self, extra: dict | None = None) -> None:
        if not dist.is_main():
            return
        doc = {"settings": self.settings(), "evaluations": self.log, **(extra or {})}
        with atomic_open(self.log_path, "w") as f:
            json.dump(doc, f, indent=1)


def adaptive_select(scorer: Scorer, paths: list[str], cfg: RunConfig, out: str, final_offset: int) -> list[dict]:
    """The selection over every snapshot in `paths`: one entry per snapshot ('snapshot', 'path', 'images',
    'best': its screened point), the chosen one with its 'final' evaluation and the walk's 'selection' summary."""
    c, key = cfg.sweep, objective_key(cfg.sweep.objective)
    os.makedirs(os.path.join(out, "sweep"), exist_ok=True)
    trust = bool(cfg.load_args.get("trust_architecture"))
    choice, measure, summary = walk(scorer, paths, c, trust, os.path.join(out, "sweep", "selection.json"))
    as_point = measure.as_point
    entries = []
    for i, path in enumerate(paths):
        name = snapshot_name(path)
        screened = next(p for p in choice.screened if p.snapshot == i)
        entry = {"snapshot": os.path.basename(path.rstrip("/")), "path": path, "images": images_seen(path),
                 "best": as_point(screened, measure.levels[0])}
        _write_points(measure, out, name, key)
        if i == choice.point.snapshot:
            entry["best"] = as_point(choice.point, choice.estimate.n)
            entry["final"] = _final(scorer, measure, cfg, path, entry, out, final_offset)
            entry["selection"] = summary
        entries.append(entry)
    dist.barrier()
    return entries


def walk(scorer: Scorer, paths: list[str], c: SweepConfig, trust: bool, log_path: str):
    """The adaptive walk over the snapshots in `paths` -> (its Choice, the Measurer, the summary recorded in the
    log under 'choice': protocol, images, evaluations, seconds, the chosen and still-open points)."""
    measure = Measurer(scorer, paths, c, trust, log_path)
    t0 = time.time()
    choice = Adaptive(measure, len(paths), c.w, c.cfg, measure.levels[0], measure.n_max, c.z, c.indifference).run()
    n = choice.estimate.n
    summary = {"protocol": PROTOCOL, "images": protocol_images(measure.log),
               "sampled": sum(e["sampled"] for e in measure.log), "evaluations": len(measure.log),
               "decided": choice.decided, "seconds": round(time.time() - t0, 1),
               "open": [measure.as_point(p, n) | {"snapshot": measure.coordinates(p)[0]} for p in choice.open],
               "chosen": measure.as_point(choice.point, n) | {"snapshot": measure.coordinates(choice.point)[0]}}
    measure.save({"choice": summary})
    return choice, measure, summary


def protocol_images(log: list[dict]) -> int:
    """Images the walk asked for: each point's largest n (raising a point from n to 2n samples n more)."""
    most: dict[tuple, int] = {}
    for e in log:
        k = (e["snapshot"], e["w"], e["cfg"])
        most[k] = max(most.get(k, 0), e["n"])
    return sum(most.values())


def _write_points(measure: Measurer, out: str, name: str, key: str) -> None:
    """sweep/<snapshot>.json: the snapshot's points at the screening count (what its walk compared)."""
    if not dist.is_main():
        return
    n0 = measure.levels[0]
    pts = [{"w": e["w"], "cfg": e["cfg"], "setting": {}, key: e["value"], "jackknife_std": e["std"], "num_images": n0,
            "order": i, "seconds": e["seconds"]}
           for i, e in enumerate(e for e in measure.log if e["snapshot"] in (name, THETA_R) and e["n"] == n0)]
    best = min(pts, key=lambda p: (p[key], p["order"])) if pts else None
    with atomic_open(os.path.join(out, "sweep", f"{name}.json"), "w") as f:
        json.dump({"settings": measure.settings(), "points": pts, "best": best}, f, indent=1)


def _final(scorer: Scorer, measure: Measurer, cfg: RunConfig, path: str, entry: dict, out: str,
           final_offset: int) -> dict:
    """θneon's final evaluation at the chosen point (reused from sweep/<snapshot>-final.json when it is there)."""
    name = snapshot_name(path)
    done_path = os.path.join(out, "sweep", f"{name}-final.json")
    if os.path.isfile(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done.get("best") == entry["best"] and len(per_range(done["final"])) == cfg.final.repeats:
            return done["final"]
    theta_s = load_state_dict(path, measure.trust)
    sweep = Sweep(scorer, points.neon(scorer.theta_r, theta_s, cfg.sweep.cfg_key), cfg.sweep, None, plot=False)
    final = point_final(sweep, cfg, entry["best"], final_offset, f"final {name}")
    if dist.is_main():
        with atomic_open(done_path, "w") as f:
            json.dump({**entry, "final": final}, f, indent=1)
    return final

