"""`neon sweep`: choose w (× guidance scale) for θs snapshots on the command line — the adaptive walk over one or
more snapshots (neon/adaptive_sweep.py), or the grid / official walk over one (neon/sweep.py)."""
from __future__ import annotations

import argparse
import os

from neon import dist
from neon.adaptive_sweep import walk
from neon.checkpoint import load_state_dict
from neon.config import SweepConfig, build_config, check_args
from neon.errors import NeonError
from neon.evaluate import FIDMetric, MetricFactory
from neon.family import Bundle, Family
from neon.score import Scorer, on_device
from neon.sweep import neon_sweep, state_dict_copy


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    from neon.sampling import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--synth", required=True, nargs="+",
                   help="θs: the self-trained checkpoint (search adaptive: one or more snapshots to choose among)")
    p.add_argument("--ref-stats", required=True, help="reference statistics .npz (mu, sigma)")
    p.add_argument("--out", required=True, help="output folder (sweep.json, sweep.png)")
    p.add_argument("--w", type=float, nargs="+", required=True)
    p.add_argument("--cfg", type=float, nargs="+", help="guidance scales swept jointly with w")
    p.add_argument("--cfg-key", default="cfg", help="name of the guidance argument of the family's sampler")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--per-class", type=int)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tolerance", type=float)
    p.add_argument("--refine", type=float)
    p.add_argument("--search", choices=["adaptive", "grid", "official"],
                   help="how the grid is walked: adaptive (default without --tolerance/--refine: screen and race on "
                        "a few images, neon/adaptive.py), grid, or official (w outer, cfg inner, the scripts' stop "
                        "rules)")
    p.add_argument("--start-images", type=int, help="adaptive: images per point when screening (default 1/16)")
    p.add_argument("--stop", choices=["previous", "best"], help="official: what a w's lowest FID is compared with")
    p.add_argument("--refine-pattern", choices=["3x3", "cross"], help="official: the neighbours tried")
    p.add_argument("--refine-centre", choices=["frozen", "moving"], help="official: around which best point")
    p.add_argument("--refine-decimals", type=int, help="official: neighbours printed with printf('%%.Nf')")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="sampler argument")
    p.add_argument("--detector", default="inception-v3-compat")
    p.add_argument("--detector-weights")


def sweep_main(args) -> None:
    from neon.sampling import load_model, parse_kv
    family, bundle = load_model(args)
    check_args(family.SAMPLER_ARGS, parse_kv(args.arg), "--arg")
    cfg = build_config(SweepConfig, {"w": args.w, "cfg": args.cfg, "cfg_key": args.cfg_key,
                                     "num_images": args.num_images, "per_class": args.per_class, "batch": args.batch,
                                     "tolerance": args.tolerance, "refine": args.refine, "search": args.search,
                                     "stop": args.stop, "refine_pattern": args.refine_pattern,
                                     "refine_centre": args.refine_centre, "refine_decimals": args.refine_decimals,
                                     "start_images": args.start_images, "sampler": parse_kv(args.arg)}, "sweep")
    if cfg.search != "adaptive" and len(args.synth) > 1:
        raise NeonError(f"--synth: search {cfg.search} sweeps one θs; give one file, or --search adaptive to choose "
                        f"among {len(args.synth)} snapshots")
    # Each snapshot read (and its embedded source checked) before anything is sampled, one at a time: the
    # adaptive walk reads them again lazily, so only one is ever held beside θr.
    for path in args.synth[1:]:
        load_state_dict(path, args.trust_architecture)
    theta_s = load_state_dict(args.synth[0], args.trust_architecture)
    device = next(bundle.net.parameters()).device
    metric = FIDMetric(args.detector, args.ref_stats, device, args.detector_weights)
    if cfg.search == "adaptive":
        del theta_s
        return adaptive_main(family, bundle, cfg, metric, args)
    sweep = neon_sweep(family, bundle, state_dict_copy(bundle.net), theta_s, cfg, metric,
                       os.path.join(args.out, "sweep.json"))
    best = sweep.run()
    if dist.is_main():
        print(f"best: w={best['w']:g}" + ("" if best["cfg"] is None else f" {cfg.cfg_key}={best['cfg']:g}")
              + f" FID {best['fid']:.4f} (w=0 points: "
              + ", ".join(f"{p['fid']:.4f}" for p in sweep.points.values() if p["w"] == 0) + ")")


def adaptive_main(family: Family, bundle: Bundle, cfg: SweepConfig, metric: MetricFactory, args) -> None:
    """`neon sweep --search adaptive`: the walk over every --synth snapshot, logged in <out>/selection.json."""
    theta_r = on_device(state_dict_copy(bundle.net), bundle.net.state_dict())
    os.makedirs(args.out, exist_ok=True)
    _, _, summary = walk(Scorer(family, bundle, metric, theta_r), list(args.synth), cfg, args.trust_architecture,
                         os.path.join(args.out, "selection.json"))
    if dist.is_main():
        best = summary["chosen"]
        print(f"best: {best['snapshot']} w={best['w']:g}"
              + ("" if best["cfg"] is None else f" {cfg.cfg_key}={best['cfg']:g}")
              + f" FID {best['fid']:.4f} ± {best['jackknife_std']:.4f} on {best['num_images']} images "
              + f"({summary['images']} images in {summary['evaluations']} measurements"
              + ("" if summary["decided"] else "; still open at the last count") + ")")
