"""Evaluate one checkpoint: sample N images with fixed seeds (split over torchrun ranks), FID/IS against
reference statistics, optionally keep the images. `evaluate_images` and `FIDMetric` are also what the sweep
measures each merge weight with. The family front-ends with the official scripts' flags
(`python -m edm.calculate_fid`, `var.calculate_fid`, `xar.calculate_fid`, `imm.calculate_fid`) call this, as
does `neon evaluate`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from neon import dist, paths
from neon.checkpoint import atomic_open, local_path
from neon.errors import NeonError
from neon.family import Bundle, Family, get_family
from neon.sampling import (
    deal,
    draw_labels,
    generate,
    model_load_args,
    parse_kv,
    parse_seeds,
    plan_batches,
    plan_seeds,
    sample_to_npz,
)

# A metric is a factory of accumulators: acc = metric(); acc.update(uint8 NHWC, seeds); acc.finish() -> {'fid': ...}
MetricFactory = Callable[[], object]


def evaluate_images(family: Family, bundle: Bundle, metric: MetricFactory, num_images: int | None = None,
                    per_class: int | None = None, seed_offset: int = 0, batch: int = 64,
                    sampler_args: dict | None = None, desc: str | None = None,
                    seeds: list[int] | None = None, labels=None) -> dict:
    """Sample `num_images` images (seeds from `seed_offset`, or the given `seeds`; split over ranks) and
    return the metric's result. Labels: given, balanced with `per_class`, or drawn from each seed."""
    if seeds is None:
        seeds = plan_seeds(None if per_class else num_images, per_class, bundle.num_classes, seed_offset)
    if labels is None:
        labels = draw_labels(family, bundle, seeds, "per_class" if per_class else "random")
    # Whole batches per rank, so every image is computed in the same batch on any number of processes.
    mine = [i for part in deal(plan_batches(len(seeds), batch)) for i in part]
    acc = metric()
    for chunk, _, images in generate(family, bundle, [seeds[i] for i in mine],
                                     None if labels is None else labels[mine], batch, sampler_args or {}, desc):
        acc.update(torch.from_numpy(images), chunk)
    result = dict(acc.finish())
    result["num_images"] = len(seeds)
    return result


# ---------------------------------------------------------------------------------------------------------
# The metric the sweep uses, from a run config's `metrics` section.

class FIDMetric:
    """FID (and IS when asked) of image batches against reference statistics; calling it starts one
    accumulator: `acc = metric(); acc.update(uint8 images, seeds); acc.finish() -> {'fid', 'is_mean', ...}`."""

    def __init__(self, detector: str, ref_stats: str, device, weights: str | None = None,
                 inception_score: bool = False):
        from neon import metrics
        self.ref = metrics.load_stats(ref_stats)
        self.extractor = metrics.FeatureExtractor(detector, weights=weights, device=device, logits=inception_score)
        if self.ref.dim != self.extractor.dim:
            raise NeonError(f"{ref_stats}: statistics are {self.ref.dim}-d, the {detector} detector gives "
                            f"{self.extractor.dim}-d features")
        self.inception_score = inception_score

    def __call__(self):
        return _FIDAccumulator(self)


class _FIDAccumulator:
    def __init__(self, metric: FIDMetric):
        from neon.metrics import FeatureAccumulator
        self.metric = metric
        self.acc = FeatureAccumulator(metric.extractor, logits=metric.inception_score)

    def update(self, images, seeds) -> None:
        self.acc.update(images, index=seeds)

    def finish(self) -> dict:
        from neon.metrics import evaluate
        return evaluate(self.acc, self.metric.ref, inception_score=self.metric.inception_score)




def evaluate_checkpoint(family: str, ckpt: str, ref: str, *, load_args: dict | None = None,
                        seeds: list[int] | None = None, num_images: int | None = None,
                        per_class: int | None = None, batch: int = 64, sampler_args: dict | None = None,
                        detector: str = "inception-v3-compat", weights: str | None = None,
                        inception_score: bool = True, json_out: str | None = None,
                        save_images: str | None = None, class_idx: int | None = None) -> dict:
    """FID (and IS) of `ckpt`'s samples. Seeds: an explicit list, or 0..N-1 (N = num_images, or per_class·C
    with balanced labels); random labels come from each seed (the family's rule where it has one), or every
    image gets class `class_idx`."""
    ref, ckpt = local_path(ref), paths.input_file(local_path(ckpt), "checkpoint")
    if json_out:
        paths.output_file(json_out, "JSON file")  # refused now, not after the sampling
    if batch <= 0:
        raise NeonError(f"--batch: must be positive, got {batch}")
    fam = get_family(family)
    bundle = fam.load(ckpt, dist.init(), **(load_args or {}))
    return evaluate_bundle(fam, bundle, ref, seeds=seeds, num_images=num_images, per_class=per_class,
                           batch=batch, sampler_args=sampler_args, detector=detector, weights=weights,
                           inception_score=inception_score, json_out=json_out, save_images=save_images,
                           class_idx=class_idx, extra={"checkpoint": ckpt})


def evaluate_bundle(fam, bundle, ref: str, *, seeds=None, num_images=None, per_class=None, batch=64,
                    sampler_args=None, detector="inception-v3-compat", weights=None, inception_score=True,
                    json_out=None, save_images=None, class_idx=None, labels=None, extra: dict | None = None) -> dict:
    """`evaluate_checkpoint` for networks already loaded (`labels`: one per seed, overriding the rules)."""
    ref = local_path(ref)
    if os.path.isdir(ref):
        raise NeonError(f"{ref}: is a folder, expected reference statistics")
    if not os.path.isfile(ref):
        raise NeonError(f"{ref}: reference statistics not found (bash download_models.sh fetches them)")
    device = next(bundle.net.parameters()).device
    metric = FIDMetric(detector, ref, device, weights, inception_score)  # fails fast on a bad ref or detector
    t0 = time.time()
    if seeds is None:
        seeds = plan_seeds(None if per_class else num_images, per_class, bundle.num_classes)
    if labels is not None:
        labels = draw_labels(fam, bundle, seeds, "list", labels)
    elif class_idx is not None:
        labels = draw_labels(fam, bundle, seeds, "list", [class_idx] * len(seeds))
    else:
        labels = draw_labels(fam, bundle, seeds, "per_class" if per_class else "random")
    if save_images:  # keep the images (resumable), then measure them
        if not os.path.isfile(save_images):
            sample_to_npz(fam, bundle, seeds, labels, save_images, batch, sampler_args)
        from neon import metrics
        summary = metrics.summarize_images(save_images, metric.extractor, batch, logits=inception_score)
        result = metrics.evaluate(summary, metric.ref, inception_score=inception_score)
    else:
        result = evaluate_images(fam, bundle, metric, batch=batch, sampler_args=sampler_args, desc="sampling",
                                 seeds=seeds, labels=labels)
    result.update(family=fam.name, ref=ref, detector=detector, sampler=sampler_args or {},
                  world_size=dist.world_size(), seconds=round(time.time() - t0, 1), **(extra or {}))
    if dist.is_main():
        is_txt = "" if result.get("is_mean") is None else f"  IS {result['is_mean']:.3f} ± {result['is_std']:.3f}"
        print(f"FID {result['fid']:.4f}{is_txt}  ({result['num_images']} images, {detector})", flush=True)
        if json_out:
            with atomic_open(json_out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    return result


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    from neon.sampling import add_model_arguments
    add_model_arguments(p)
    p.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--seeds", help="e.g. 0-49999 (EDM style)")
    which.add_argument("--num-images", type=int, default=50_000, help="seeds 0..N-1, random labels")
    which.add_argument("--per-class", type=int, help="N images of every class")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="sampler argument, e.g. cfg=1.5")
    p.add_argument("--detector", default="inception-v3-compat", choices=["inception-v3-compat", "nvidia"])
    p.add_argument("--inception-weights", help="detector weights (path, or 'fid-helper' offline)")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--json", help="write the result as JSON")
    p.add_argument("--save-images", help="keep the samples in this .npz (resumable)")


def evaluate_main(args) -> None:
    if args.tiny:
        raise NeonError("neon evaluate needs a checkpoint (--ckpt)")
    evaluate_checkpoint(args.family, args.ckpt, args.ref, load_args=model_load_args(args),
                        seeds=parse_seeds(args.seeds) if args.seeds else None,
                        num_images=None if args.per_class else args.num_images, per_class=args.per_class,
                        batch=args.batch, sampler_args=parse_kv(args.arg), detector=args.detector,
                        weights=args.inception_weights, inception_score=not args.no_is, json_out=args.json,
                        save_images=args.save_images)
