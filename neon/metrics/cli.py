"""`neon fid` and `neon stats`: metrics of an image set on disk, one share per torchrun rank.

    neon fid --images samples.npz --ref ref.npz [--detector nvidia|dinov2] [--detector-weights PATH|fid-helper]
             [--is] [--prdc] [--kid] [--real real.npz|folder|stats.npz] [--json out.json] [--batch 64]
             [--num-images N]
    neon stats --images real.npz|folder --out ref.npz [--detector ...] [--detector-weights PATH] [--features]

`--detector dinov2 --detector-weights dinov2_vitl14_pretrain.pth` gives FD_DINOv2 as EDM2 computes it
(1024-d statistics; the result's 'fid' key then holds FD_DINOv2, and 'detector' says which).

Image sets: ADM-style .npz (`arr_0` uint8 N×H×W×3) or a folder of PNG/JPEG files (sorted by path).
Option names avoid prefixes of torchrun's own options (`--pr`, `--num` would be taken as `--print-completion`,
`--numa-binding` by `torchrun ... -m neon fid ...`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from neon import dist, paths
from neon.checkpoint import atomic_open
from neon.errors import NeonError
from neon.images import npz_names, open_images
from neon.metrics.accumulate import Summary, summarize_images
from neon.metrics.evaluate import evaluate
from neon.metrics.features import DETECTORS, FeatureExtractor
from neon.metrics.kid import SUBSET_SIZE, SUBSETS
from neon.metrics.stats import Stats, check_detector, load_stats, save_stats


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="image set: .npz with arr_0 (uint8 NHWC) or a folder of PNGs")
    p.add_argument("--detector", default="inception-v3-compat", choices=DETECTORS,
                   help="feature network (default: torch-fidelity's inception-v3-compat; 'nvidia' for EDM rows; "
                        "'dinov2' for FD_DINOv2 as EDM2 computes it)")
    p.add_argument("--detector-weights", "--inception-weights", dest="inception_weights", default=None,
                   metavar="PATH",
                   help="detector weights: a torch-fidelity .pth; NVIDIA's inception-2015-12-05.pkl for --detector "
                        "nvidia; dinov2_vitl14_pretrain.pth for --detector dinov2; or 'fid-helper' (offline pool3 "
                        "weights, either Inception detector, no IS). Default: torch-fidelity's download "
                        "(inception-v3-compat only)")
    p.add_argument("--batch", type=int, default=64, help="images per network call on each rank")
    p.add_argument("--num-images", type=int, default=None, metavar="N", help="use the first N images (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_fid_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma): EDM fid-refs, ADM stats")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="also the Inception Score (--splits parts)")
    p.add_argument("--prdc", action="store_true", help="also precision/recall/density/coverage against --real")
    p.add_argument("--kid", action="store_true", help="also the Kernel Inception Distance against --real "
                   "(torch-fidelity's subsets, polynomial kernel and seed)")
    p.add_argument("--real", help="real set for --prdc / --kid: images (.npz arr_0 / folder) or "
                   "`neon stats --features` output")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours for --prdc (the paper: 5)")
    p.add_argument("--kid-subsets", type=int, default=SUBSETS, help="KID: number of random subsets")
    p.add_argument("--kid-subset-size", type=int, default=SUBSET_SIZE,
                   help="KID: images per subset (the smaller set's size when it holds fewer)")
    p.add_argument("--splits", type=int, default=10, help="IS splits")
    p.add_argument("--json", help="also write the results here (atomically)")


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--out", required=True, help="output .npz (mu, sigma float64, count)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--features", action="store_true",
                   help="also store the pool features (for `neon fid --prdc / --kid`, metrics.real_features)")


def _check_real(args) -> None:
    if (args.prdc or args.kid) and not args.real:
        raise NeonError(f"{'--prdc' if args.prdc else '--kid'} needs --real (real images, or statistics saved with "
                        "`neon stats --features`)")


def _real_set(args, extractor: FeatureExtractor) -> Stats | Summary:
    """Real features for --prdc / --kid: statistics saved with `neon stats --features`, or extracted from real
    images."""
    real = Path(args.real)
    if real.suffix == ".npz" and real.is_file():
        keys = npz_names(str(real))
        if "features" in keys:
            return load_stats(real, dim=extractor.dim)
        if "arr_0" not in keys and "mu" in keys:
            raise NeonError(f"--real {real}: statistics without features; make them with `neon stats --features`")
    # all real images
    return summarize_images(args.real, extractor, args.batch, keep_features=True, logits=False,
                            progress=not args.quiet)


def _report(result: dict) -> str:
    name = "FD_DINOv2" if result["detector"] == "dinov2" else "FID"
    lines = [f"{name} {result['fid']:.4f}  ({result['num_images']} images, {result['detector']})"]
    if "is_mean" in result:
        lines.append(f"IS {result['is_mean']:.3f} ± {result['is_std']:.3f}" if result["is_mean"] is not None
                     else f"IS unavailable: {result['is_unavailable']}")
    if "precision" in result:
        lines.append("precision {precision:.4f}  recall {recall:.4f}  density {density:.4f}  "
                     "coverage {coverage:.4f}  (k={k})".format(**result))
    if "kid_mean" in result:
        lines.append("KID {kid_mean:.6f} ± {kid_std:.6f}  ({kid_subset_size} images per subset)".format(**result))
    return "\n".join(lines)


def _check_counts(args: argparse.Namespace) -> None:
    """Counts a loop divides or steps by: refused in one line rather than deep in that loop."""
    counts = {"--batch": args.batch, "--num-images": args.num_images}
    for flag, name in (("--k", "k"), ("--kid-subsets", "kid_subsets"), ("--kid-subset-size", "kid_subset_size"),
                       ("--splits", "splits")):
        if hasattr(args, name):
            counts[flag] = getattr(args, name)
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise NeonError(f"{flag}: must be a positive number, got {value}")


def fid_main(args: argparse.Namespace) -> dict:
    _check_counts(args)
    if args.json:
        paths.output_file(args.json, "JSON file")  # refused now, not after the extraction
        paths.check_apart(args.json, [args.images, args.ref] + ([args.real] if args.real else []))
    if args.inception_score and args.detector == "dinov2":
        raise NeonError("--is: the Inception Score needs an Inception detector, not dinov2")
    dist.init()
    ref = load_stats(args.ref)  # fail before the long extraction
    check_detector(ref, args.detector, args.ref)
    _check_real(args)
    images = open_images(args.images)   # every header checked before the detector is loaded
    extractor = FeatureExtractor(args.detector, args.inception_weights, logits=args.inception_score)
    if ref.dim != extractor.dim:
        raise NeonError(f"{args.ref}: statistics are {ref.dim}-d but the detector gives {extractor.dim}-d features")
    real = _real_set(args, extractor) if args.prdc or args.kid else None
    summary = summarize_images(images, extractor, args.batch, num=args.num_images,
                               keep_features=real is not None, logits=args.inception_score, progress=not args.quiet)
    result = evaluate(summary, ref, inception_score=args.inception_score, splits=args.splits, real=real, k=args.k,
                      precision_recall=args.prdc, kid=args.kid, kid_subsets=args.kid_subsets,
                      kid_subset_size=args.kid_subset_size)
    result.update(detector=args.detector, weights=args.inception_weights, images=str(args.images), ref=str(args.ref),
                  world_size=dist.world_size())
    if args.prdc:
        result["k"] = args.k
    if dist.is_main():
        print(_report(result), flush=True)
        if args.json:
            with atomic_open(args.json, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
    dist.barrier()
    return result


def stats_main(args: argparse.Namespace) -> Stats:
    _check_counts(args)
    paths.output_file(args.out, ".npz file")  # refused now, not after the extraction
    paths.check_apart(args.out, [args.images])
    if os.path.exists(args.out) and not args.force:
        raise NeonError(f"{args.out} exists (use --force to replace it)")
    dist.init()
    images = open_images(args.images)   # every header checked before the detector is loaded
    extractor = FeatureExtractor(args.detector, args.inception_weights, logits=False)
    summary = summarize_images(images, extractor, args.batch, num=args.num_images,
                               keep_features=args.features, logits=False, progress=not args.quiet)
    stats = summary.stats(with_features=args.features)
    if dist.is_main():
        save_stats(args.out, stats.mu, stats.sigma, count=stats.count, features=stats.features,
                   detector=args.detector)
        print(f"{args.out}: mu {stats.mu.shape}, sigma {stats.sigma.shape} from {stats.count} images", flush=True)
    dist.barrier()
    return stats
