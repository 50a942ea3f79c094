"""Stage 3 over self-training length: one sweep of w (× cfg) per θs snapshot, then the final evaluation of θneon
at each snapshot's best point; the best snapshot is the one with the best final objective (`sweep.objective`,
the mean over the `final.repeats` seed ranges).

This is the official protocol (SinaAlemohammad/Neon @76496c3: edm/cal_metrics_all.py loops over every
network-snapshot-*.pkl; VAR/*/run_var_imagenet_*.sh, xAR/run_xar{b,l}.sh and imm/run_imm_imagenet_256.sh loop
over their snapshot lists, each with its own grid walk and a 50k evaluation at that snapshot's best point).
Files, all resumable: `sweep/<snapshot>.json` (that snapshot's points, neon.sweep.Sweep), `sweep/<snapshot>.png`,
`sweep/<snapshot>-final.json` (its final evaluation), and `sweep.json` / `sweep.png`, the summary over snapshots.
"""
from __future__ import annotations

import json
import os
import time

from neon import dist
from neon import score as points
from neon.checkpoint import atomic_open, atomic_path, load_state_dict
from neon.config import OBJECTIVE_LABELS, SNAPSHOT_NAME, RunConfig, final_seed_ranges
from neon.errors import NeonError
from neon.repeats import combine_ranges, per_range
from neon.score import Point, Scorer, Seeds
from neon.sweep import Sweep, metrics_label, plot_sweep


def snapshot_name(path: str) -> str:
    """'snapshot-0000250368' of 'finetune/snapshot-0000250368.pth' (or of a pipeline folder of that name)."""
    return os.path.splitext(os.path.basename(path.rstrip("/")))[0]


def images_seen(path: str) -> int | None:
    """Images seen when the snapshot was written, read from its name."""
    match = SNAPSHOT_NAME.fullmatch(os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else None


def select_snapshots(paths: list[str], choice: str | list) -> list[str]:
    """The snapshots `sweep.snapshot` names among those written (`paths`, in training order): 'last', 'all',
    a file name (with or without its extension), or a list of file names or image counts. An unknown one is a
    one-line NeonError."""
    if choice == "last":
        return paths[-1:]
    if choice == "all":
        return list(paths)
    chosen = []
    for i, item in enumerate([choice] if isinstance(choice, str) else choice):
        where = "sweep.snapshot" + ("" if isinstance(choice, str) else f"[{i}]")
        found = [p for p in paths if (item in (os.path.basename(p.rstrip("/")), snapshot_name(p))
                                      if isinstance(item, str) else images_seen(p) == item)]
        if not found:
            known = ", ".join(os.path.basename(p.rstrip("/")) for p in paths)
            raise NeonError(f"{where}: no snapshot {item!r} among those self-training wrote ({known})")
        chosen += [p for p in found if p not in chosen]
    return chosen


# ---------------------------------------------------------------------------------------------------------
# One final evaluation: N images on each of the final seed ranges, with the sampler arguments and seeds recorded.

def final_result(scorer: Scorer, point: Point, cfg: RunConfig, offset: int, desc: str) -> dict:
    """The point's metrics on `final.repeats` disjoint seed ranges from `offset` (neon.repeats.combine_ranges:
    their mean, std and each range's numbers when there are several)."""
    f = cfg.final
    t0 = time.time()
    ranges = final_seed_ranges(cfg, offset, scorer.bundle.num_classes)   # (per_class counts final.classes)
    results = []
    for first, last in ranges:
        result = scorer.score(point, Seeds(f.num_images, f.per_class, first, f.batch, f.classes),
                              desc=desc + (f" (seeds {first}–{last})" if len(ranges) > 1 else ""))
        results.append({**result, "seeds": [first, last]})
    return {**combine_ranges(results), "sampler": dict(point.sampler), "seconds": round(time.time() - t0, 1)}


def point_final(sweep: Sweep, cfg: RunConfig, chosen: dict, offset: int, desc: str) -> dict:
    """A sweep's chosen point (w or ω, cfg, setting) on the final seeds, with the final section's sampler."""
    point = sweep.point(chosen["w"], chosen["cfg"], chosen.get("setting", {}), cfg.final.sampler)
    return {**point.at, **final_result(sweep.scorer, point, cfg, offset, desc)}


# ---------------------------------------------------------------------------------------------------------
# One snapshot: its sweep, then the final evaluation at its best point (each setting's best, with a grid).

def sweep_snapshot(scorer: Scorer, path: str, cfg: RunConfig, out: str, final_offset: int) -> dict:
    """{'snapshot', 'path', 'images', 'best', 'final'[, 'final_per_setting']} of the snapshot at `path`; read
    back from sweep/<snapshot>-final.json when that exists (a rerun skips the snapshot)."""
    name = snapshot_name(path)
    done_path = os.path.join(out, "sweep", f"{name}-final.json")
    if os.path.isfile(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if len(per_range(done["final"])) == cfg.final.repeats:   # else: its points are kept, its finals redone
            return done
    theta_s = load_state_dict(path, bool(cfg.load_args.get("trust_architecture")))  # θs copies θr's file
    os.makedirs(os.path.dirname(done_path), exist_ok=True)
    sweep = Sweep(scorer, points.neon(scorer.theta_r, theta_s, cfg.sweep.cfg_key), cfg.sweep,
                  os.path.join(out, "sweep", f"{name}.json"))
    if dist.is_main():
        print(f"sweeping θs = {os.path.basename(path)}")
    best = sweep.run()
    entry = {"snapshot": os.path.basename(path.rstrip("/")), "path": path, "images": images_seen(path),
             "best": best}
    if len(sweep.settings_grid) == 1:
        entry["final"] = point_final(sweep, cfg, best, final_offset, f"final {name}")
    else:
        per_setting = [point_final(sweep, cfg, sweep.best(s), final_offset, f"final {name} {s}")
                       for s in sweep.settings_grid]
        entry["final"] = next(r for r in per_setting if r["setting"] == best.get("setting", {}))
        entry["final_per_setting"] = per_setting
    if dist.is_main():
        print(f"{name}: final {metrics_label(entry['final'], sweep.key)} at w={best['w']:g}")
        with atomic_open(done_path, "w") as f:
            json.dump(entry, f, indent=1)
    dist.barrier()
    return entry


def best_entry(entries: list[dict], key: str = "fid") -> dict:
    """The snapshot with the lowest final objective `key` (the earliest of equals) among those evaluated (the
    adaptive protocol evaluates its chosen snapshot only)."""
    return min((e for e in entries if "final" in e), key=lambda e: e["final"][key])


def selection_cost(entries: list[dict], out: str, cfg: RunConfig) -> dict:
    """What choosing θneon's point cost: the protocol, the images it sampled (official / grid: every sweep point
    and every snapshot's final evaluation, which is what picks the snapshot; adaptive: every measurement, each
    image counted once), the points it measured and its seconds."""
    chosen = next((e for e in entries if "selection" in e), None)
    if chosen is not None:
        s = chosen["selection"]
        return {k: s[k] for k in ("protocol", "images", "evaluations", "decided", "seconds")}
    pts = [p for e in entries for p in snapshot_points(out, e)]
    finals = [r for e in entries for r in per_range(e["final"])]
    return {"protocol": cfg.sweep.search, "images": sum(p["num_images"] for p in pts)
            + sum(r["num_images"] for r in finals), "evaluations": len(pts), "decided": True,
            "seconds": round(sum(p.get("seconds", 0) for p in pts) + sum(e["final"].get("seconds", 0)
                                                                         for e in entries), 1)}


def write_summary(out: str, entries: list[dict], cfg_key: str, key: str = "fid") -> dict:
    """sweep.json: every swept snapshot, the best one by the final objective `key`, and its points (what one
    sweep's file holds); and sweep.png. Returns the document."""
    best = best_entry(entries, key)
    with open(os.path.join(out, "sweep", f"{snapshot_name(best['snapshot'])}.json")) as f:
        best_sweep = json.load(f)
    doc = {"settings": best_sweep["settings"], "objective": key,
           "snapshots": [{k: e[k] for k in ("snapshot", "images", "best", "final") if k in e} for e in entries],
           "best_snapshot": best["snapshot"], "best": {**best["best"], "snapshot": best["snapshot"]},
           "final": best["final"], "points": best_sweep["points"]}
    if dist.is_main():
        with atomic_open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump(doc, f, indent=1)
        plot_snapshots(entries, out, os.path.join(out, "sweep.png"), cfg_key, key)
    return doc


# ---------------------------------------------------------------------------------------------------------
# The picture: the objective over (snapshot, w), to see how the best w moves as self-training lengthens (Eq. 4).

def snapshot_points(out: str, entry: dict) -> list[dict]:
    """The sweep points of one swept snapshot (from sweep/<snapshot>.json)."""
    with open(os.path.join(out, "sweep", f"{snapshot_name(entry['snapshot'])}.json")) as f:
        return json.load(f)["points"]


def plot_snapshots(entries: list[dict], out: str, path: str, cfg_key: str = "cfg", key: str = "fid") -> None:
    """One snapshot: its objective against w (neon.sweep.plot_sweep). Several: left, heat map of the sweep
    objective `key`, one row per snapshot, one column per w (each w's best over
    guidance scales and settings), each row's best point starred. Right: each snapshot's best w and its final
    objective."""
    name = OBJECTIVE_LABELS[key]
    if len(entries) == 1:   # one snapshot: its objective against w says more than a one-row heat map
        plot_sweep(snapshot_points(out, entries[0]), path, cfg_key, key)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    grids = [snapshot_points(out, e) for e in entries]
    ws = sorted({p["w"] for pts in grids for p in pts})
    values = np.full((len(entries), len(ws)), np.nan)
    for row, pts in enumerate(grids):
        for p in pts:
            col = ws.index(p["w"])
            values[row, col] = np.nanmin([values[row, col], p[key]])
    labels = [_images_label(e["images"]) if e["images"] is not None else e["snapshot"] for e in entries]
    fig, (heat, trend) = plt.subplots(1, 2, figsize=(10, 0.9 + max(2.8, 0.28 * len(entries))), dpi=120,
                                      gridspec_kw={"width_ratios": [1.5, 1]})
    image = heat.imshow(values, aspect="auto", cmap="viridis_r", interpolation="nearest")
    heat.set_xticks(range(len(ws)), [f"{w:g}" for w in ws], fontsize=7, rotation=90 if len(ws) > 12 else 0)
    heat.set_yticks(range(len(entries)), labels, fontsize=7)
    heat.plot([ws.index(e["best"]["w"]) for e in entries], range(len(entries)), "*", color="w", ms=9, mec="k",
              label="best w of the snapshot")
    heat.set_xlabel("merge weight w   (θneon = (1+w)·θr − w·θs)")
    heat.set_ylabel("θs: images seen in self-training")
    guided = any(p["cfg"] is not None or p.get("setting") for pts in grids for p in pts)
    heat.set_title(f"sweep {name}, {entries[0]['best'].get('num_images', '?')} images per point"
                   + (f" (each w at its best {cfg_key} / setting)" if guided else ""), fontsize=9)
    heat.legend(fontsize=7, loc="lower right")
    bar = fig.colorbar(image, ax=heat, fraction=0.05, pad=0.02)
    bar.set_label(f"sweep {name} (lower is better)", fontsize=8)
    bar.formatter.set_useOffset(False)   # FIDs that differ in the 2nd decimal read as they are, not as an offset
    bar.update_ticks()
    x = [e["images"] if e["images"] is not None else i for i, e in enumerate(entries)]
    trend.plot(x, [e["best"]["w"] for e in entries], "o-", ms=4, color="C0", label="best w (left axis)")
    trend.set_xlabel("θs: images seen in self-training")
    trend.set_ylabel("best w", color="C0")
    final = trend.twinx()
    final.plot(x, [e["final"][key] if "final" in e else float("nan") for e in entries], "s--", ms=4, color="C3",
               label=f"final {name} at that w (right axis)")
    final.set_ylabel(f"final {name} ({best_entry(entries, key)['final']['num_images']} images)", color="C3")
    best = best_entry(entries, key)
    final.plot([x[entries.index(best)]], [best["final"][key]], "*", ms=14, color="k",
               label=f"best snapshot: {best['snapshot']}")
    handles = trend.get_legend_handles_labels()[0] + final.get_legend_handles_labels()[0]
    final.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
    trend.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _images_label(images: int) -> str:
    return f"{images / 1e6:.3g}M" if images >= 1_000_000 else f"{images / 1e3:.4g}k" if images >= 1000 else str(images)

