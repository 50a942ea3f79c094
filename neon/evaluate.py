"""Evaluate one checkpoint: sample N images with fixed seeds (split over torchrun ranks), FID/IS against
reference statistics (and FD_DINOv2 beside them, from the same images, when asked), optionally keep the images.
`evaluate_images` and `FIDMetric` are also what the sweep measures each merge weight with. The family front-ends
with the official scripts' flags (`python -m edm.calculate_fid`, `var.calculate_fid`, `xar.calculate_fid`,
`imm.calculate_fid`) call this, as does `neon evaluate`.
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

# A metric is a factory of accumulators: acc = metric(); acc.update(uint8 NHWC, seeds, labels); acc.finish() ->
# {'fid': ...}
MetricFactory = Callable[[], object]


def evaluate_images(family: Family, bundle: Bundle, metric: MetricFactory, num_images: int | None = None,
                    per_class: int | None = None, seed_offset: int = 0, batch: int = 64,
                    sampler_args: dict | None = None, desc: str | None = None,
                    seeds: list[int] | None = None, labels=None, classes: list[int] | None = None) -> dict:
    """Sample `num_images` images (seeds from `seed_offset`, or the given `seeds`; split over ranks) and
    return the metric's result. Labels: given, balanced with `per_class`, or drawn from each seed; from the
    classes [first, end) only when `classes` is given (per_class then counts those)."""
    if seeds is None:
        count = classes[1] - classes[0] if classes else bundle.num_classes
        seeds = plan_seeds(None if per_class else num_images, per_class, count, seed_offset)
    if labels is None:
        labels = draw_labels(family, bundle, seeds, "per_class" if per_class else "random", classes=classes)
    # Whole batches per rank, so every image is computed in the same batch on any number of processes.
    mine = [i for part in deal(plan_batches(len(seeds), batch)) for i in part]
    acc = metric()
    for chunk, chunk_labels, images in generate(family, bundle, [seeds[i] for i in mine],
                                                None if labels is None else labels[mine], batch, sampler_args or {},
                                                desc):
        acc.update(torch.from_numpy(images), chunk, chunk_labels)
    result = dict(acc.finish())
    result["num_images"] = len(seeds)
    return result


# ---------------------------------------------------------------------------------------------------------
# The metric the sweep uses, from a run config's `metrics` section.

PRDC_K = 5  # the paper's precision/recall neighbourhood (SinaAlemohammad/Neon@9353b47 edm/cal_PR_single.py --nearest_k)
SMOKE_REAL_FEATURES = "smoke_real_features.npz"
SMOKE_DINOV2_STATS = "smoke_ref_stats_dinov2.npz"


class FIDMetric:
    """FID (and IS, precision/recall/density/coverage, KID when asked) of image batches; calling it starts one
    accumulator: `acc = metric(); acc.update(uint8 images, seeds, labels); acc.finish() -> {'fid', 'is_mean', ...}`.

    Precision/recall and KID compare against the real images' features (`real_features`: a `neon stats
    --features` file); the accumulator then keeps the fake features too, gathered over ranks (float32, 8 KiB per
    image with 2048-d features: 400 MB for 50k images, the same rows the FID statistics are computed from).
    """

    def __init__(self, detector: str, ref_stats: str, device, weights: str | None = None,
                 inception_score: bool = False, *,
                 real_features: str | None = None,       # (N, D) real features for PRDC / KID
                 precision_recall: bool = False,         # 'precision', 'recall', 'density', 'coverage' (k = 5)
                 kid: bool = False,                      # 'kid_mean', 'kid_std' (torch-fidelity's convention)
                 kid_subsets: int = 100,                 # torch-fidelity's kid_subsets (neon.metrics.kid)
                 kid_subset_size: int = 1000,            # torch-fidelity's kid_subset_size
                 dinov2_weights: str | None = None,      # also 'fd_dinov2' with this DINOv2 network's features ...
                 dinov2_ref: str | None = None,          # ... against these DINOv2 reference statistics
                 covariance: str = "unbiased",           # the images' sigma (neon.metrics.frechet.COVARIANCES)
                 clip: str | None = None,                # also 'clip_score' with this CLIP folder's model ...
                 texts: list[str] | None = None):        # ... of each image against texts[its label]
        from neon import metrics
        self.clip, self.texts = None, texts
        if clip is not None:
            if not texts:
                raise NeonError("metrics.clip: the CLIP score needs a text per label (a text-to-image model with a "
                                "prompt set)")
            from neon.metrics.clip_score import load_clip
            self.clip = load_clip(clip, device)
        inception_score = inception_score and detector != "dinov2"   # IS is an Inception metric: FD_DINOv2 has none
        self.ref = metrics.load_stats(ref_stats)
        metrics.check_detector(self.ref, detector, ref_stats)
        self.extractor = metrics.FeatureExtractor(detector, weights=weights, device=device, logits=inception_score)
        if self.ref.dim != self.extractor.dim:
            raise NeonError(f"{ref_stats}: statistics are {self.ref.dim}-d, the {detector} detector gives "
                            f"{self.extractor.dim}-d features")
        self.inception_score, self.covariance = inception_score, covariance
        self.precision_recall, self.kid = precision_recall, kid
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.real = None
        if precision_recall or kid:
            if real_features is None:
                raise NeonError("metrics.real_features: precision/recall and KID need the real images' features "
                                "(`neon stats --images REAL --out real.npz --features`)")
            if kid and (kid_subsets < 1 or kid_subset_size < 2):
                raise NeonError(f"KID: needs kid_subsets ≥ 1 and kid_subset_size ≥ 2, got {kid_subsets} and "
                                f"{kid_subset_size}")
            # Read now, so a bad file is refused before any sampling.
            self.real = torch.from_numpy(metrics.load_real_features(real_features, self.extractor.dim,
                                                                    PRDC_K + 1 if precision_recall else 2))
        # FD_DINOv2 (EDM2's second metric) from the same images: a second extractor fed the same batches
        self.dinov2 = self.dinov2_ref = None
        if (dinov2_weights is None) != (dinov2_ref is None):
            raise NeonError("metrics.fd_dinov2: needs both the DINOv2 weights and its reference statistics")
        if dinov2_weights is not None:
            self.dinov2 = metrics.FeatureExtractor("dinov2", weights=dinov2_weights, device=device, logits=False)
            self.dinov2_ref = metrics.load_stats(dinov2_ref)
            metrics.check_detector(self.dinov2_ref, "dinov2", dinov2_ref)
            if self.dinov2_ref.dim != self.dinov2.dim:
                raise NeonError(f"{dinov2_ref}: statistics are {self.dinov2_ref.dim}-d, the dinov2 detector gives "
                                f"{self.dinov2.dim}-d features")

    @classmethod
    def from_config(cls, m, ref_stats: str, device, stand_in: str | None = None, out: str | None = None,
                    batch: int = 64, texts: list[str] | None = None) -> FIDMetric:
        """The metric a run config's `metrics` section (neon.config.MetricsConfig) asks for. When precision/recall
        or KID is asked without `m.real_features` — which the config check allows in smoke runs only — features of
        the image set `stand_in` (the synthetic set S) are written once to `out`/smoke_real_features.npz and stand
        in for the real ones, as S's statistics stand in for the reference there: such numbers mean nothing."""
        real = m.real_features
        if (m.precision_recall or m.kid) and real is None and stand_in is not None:
            real = stand_in_stats(m.detector, m.weights, stand_in, os.path.join(out or ".", SMOKE_REAL_FEATURES),
                                  device, batch, features=True)
        dinov2 = m.fd_dinov2
        dinov2_ref = None if dinov2 is None else dinov2.ref_stats
        if dinov2 is not None and dinov2_ref is None and stand_in is not None:   # smoke runs: S's DINOv2 statistics
            dinov2_ref = stand_in_stats("dinov2", dinov2.weights, stand_in,
                                        os.path.join(out or ".", SMOKE_DINOV2_STATS), device, batch)
        return cls(m.detector, ref_stats, device, m.weights, m.inception_score, real_features=real,
                   precision_recall=m.precision_recall, kid=m.kid, kid_subsets=m.kid_subsets,
                   kid_subset_size=m.kid_subset_size, dinov2_weights=None if dinov2 is None else dinov2.weights,
                   dinov2_ref=dinov2_ref, covariance=m.covariance, clip=m.clip, texts=texts)

    @property
    def keep_features(self) -> bool:
        return self.real is not None

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of the numbers every result holds (a value may be None: IS without real logits)."""
        return (("fid",) + (("is_mean", "is_std") if self.inception_score else ())
                + (("precision", "recall", "density", "coverage") if self.precision_recall else ())
                + (("kid_mean", "kid_std") if self.kid else ()) + (("fd_dinov2",) if self.dinov2 else ())
                + (("clip_score",) if self.clip else ()))

    def __call__(self):
        return _FIDAccumulator(self)

    def score(self, summary, dinov2=None, clip: tuple[float, int] | None = None) -> dict:
        """The metric's dict from a finished accumulator's Summary (or an accumulator: collective); `dinov2`: the
        Summary (or accumulator) of the same images' DINOv2 features, when FD_DINOv2 is asked for."""
        from neon.metrics import evaluate
        result = evaluate(summary, self.ref, extractor=self.extractor, inception_score=self.inception_score,
                          real=self.real, k=PRDC_K, precision_recall=self.precision_recall, kid=self.kid,
                          kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size)
        if self.dinov2 is not None:
            result["fd_dinov2"] = evaluate(dinov2, self.dinov2_ref, inception_score=False,
                                           precision_recall=False)["fid"]
        if self.clip is not None:   # (sum, count) of the per-image scores over every rank
            total = dist.all_reduce_sum(torch.tensor(clip, dtype=torch.float64))
            result["clip_score"] = float(total[0] / total[1]) if total[1] else None
        if self.covariance != "unbiased":
            result["covariance"] = self.covariance   # a number made with another estimator says so
        return result


class _FIDAccumulator:
    def __init__(self, metric: FIDMetric):
        from neon.metrics import FeatureAccumulator
        self.metric = metric
        self.acc = FeatureAccumulator(metric.extractor, keep_features=metric.keep_features,
                                      logits=metric.inception_score, covariance=metric.covariance)
        self.dinov2 = None if metric.dinov2 is None else FeatureAccumulator(metric.dinov2, logits=False,
                                                                            covariance=metric.covariance)

        self.clip = [0.0, 0]   # sum and count of this rank's CLIP scores

    def update(self, images, seeds, labels=None) -> None:
        self.acc.update(images, index=seeds)
        if self.dinov2 is not None:
            self.dinov2.update(images, index=seeds)
        if self.metric.clip is not None:
            if labels is None:
                raise NeonError("metrics.clip: the CLIP score needs each image's label (its prompt)")
            scores = self.metric.clip.pair_scores(images, [self.metric.texts[int(k)] for k in labels])
            self.clip = [self.clip[0] + float(scores.sum()), self.clip[1] + len(scores)]

    def finish(self) -> dict:
        return self.metric.score(self.acc, self.dinov2, tuple(self.clip))


def stand_in_stats(detector: str, weights: str | None, images: str, path: str, device, batch: int,
                   features: bool = False) -> str:
    """Statistics of the image set `images` under `detector` (and, with `features`, the features themselves, as
    `neon stats --features` writes them), saved once by rank 0 at `path`. Smoke runs let those of S stand in for
    the real images' reference statistics and features."""
    from neon import metrics
    if not os.path.isfile(path):
        extractor = metrics.FeatureExtractor(detector, weights, device, logits=False)
        summary = metrics.summarize_images(images, extractor, batch, keep_features=features, logits=False)
        if dist.is_main():
            metrics.save_stats(path, summary.mu, summary.sigma, count=summary.count,
                               features=summary.features if features else None, detector=detector)
    dist.barrier()
    return path


def evaluate_checkpoint(family: str, ckpt: str, ref: str, *, load_args: dict | None = None,
                        seeds: list[int] | None = None, num_images: int | None = None,
                        per_class: int | None = None, batch: int = 64, sampler_args: dict | None = None,
                        detector: str = "inception-v3-compat", weights: str | None = None,
                        inception_score: bool = True, json_out: str | None = None,
                        save_images: str | None = None, class_idx: int | None = None,
                        scores: dict | None = None) -> dict:
    """FID (and IS) of `ckpt`'s samples. Seeds: an explicit list, or 0..N-1 (N = num_images, or per_class·C
    with balanced labels); random labels come from each seed (the family's rule where it has one), or every
    image gets class `class_idx`. `scores`: FIDMetric's keyword arguments for precision/recall and KID
    (real_features, precision_recall, kid, kid_subsets, kid_subset_size)."""
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
                           class_idx=class_idx, scores=scores, extra={"checkpoint": ckpt})


def evaluate_bundle(fam, bundle, ref: str, *, seeds=None, num_images=None, per_class=None, batch=64,
                    sampler_args=None, detector="inception-v3-compat", weights=None, inception_score=True,
                    json_out=None, save_images=None, class_idx=None, labels=None, scores: dict | None = None,
                    extra: dict | None = None) -> dict:
    """`evaluate_checkpoint` for networks already loaded (`labels`: one per seed, overriding the rules)."""
    ref = local_path(ref)
    if os.path.isdir(ref):
        raise NeonError(f"{ref}: is a folder, expected reference statistics")
    if not os.path.isfile(ref):
        raise NeonError(f"{ref}: reference statistics not found (bash download_models.sh fetches them)")
    device = next(bundle.net.parameters()).device
    # Fails fast on a bad ref, detector or real-features file.
    metric = FIDMetric(detector, ref, device, weights, inception_score, **(scores or {}))
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
        summary = metrics.summarize_images(save_images, metric.extractor, batch, keep_features=metric.keep_features,
                                           logits=inception_score)
        result = metric.score(summary)
    else:
        result = evaluate_images(fam, bundle, metric, batch=batch, sampler_args=sampler_args, desc="sampling",
                                 seeds=seeds, labels=labels)
    result.update(family=fam.name, ref=ref, detector=detector, sampler=sampler_args or {},
                  world_size=dist.world_size(), seconds=round(time.time() - t0, 1), **(extra or {}))
    if dist.is_main():
        is_txt = "" if result.get("is_mean") is None else f"  IS {result['is_mean']:.3f} ± {result['is_std']:.3f}"
        name = "FD_DINOv2" if detector == "dinov2" else "FID"
        print(f"{name} {result['fid']:.4f}{is_txt}  ({result['num_images']} images, {detector})", flush=True)
        if "precision" in result:
            print("precision {precision:.4f}  recall {recall:.4f}  density {density:.4f}  coverage {coverage:.4f}"
                  .format(**result), flush=True)
        if "kid_mean" in result:
            print("KID {kid_mean:.6f} ± {kid_std:.6f}".format(**result), flush=True)
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
    from neon.metrics.features import DETECTORS  # the detector networks load only when a command measures
    p.add_argument("--detector", default="inception-v3-compat", choices=DETECTORS)
    p.add_argument("--detector-weights", "--inception-weights", dest="inception_weights",
                   help="detector weights (path, or 'fid-helper' offline for the Inception detectors)")
    p.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    p.add_argument("--prdc", action="store_true", help="also precision/recall/density/coverage (k=5) against --real")
    p.add_argument("--kid", action="store_true", help="also the Kernel Inception Distance against --real")
    p.add_argument("--real", metavar="NPZ", help="real images' features for --prdc / --kid (`neon stats --features`)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets (torch-fidelity: 100)")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID: images per subset (torch-fidelity: 1000; the smaller set's size when it holds fewer)")
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
                        save_images=args.save_images, scores=_scores(args))


def _scores(args) -> dict:
    """FIDMetric's precision/recall and KID arguments from `neon evaluate`'s flags."""
    if (args.prdc or args.kid) and not args.real:
        raise NeonError(f"{'--prdc' if args.prdc else '--kid'} needs --real (a `neon stats --features` file)")
    return {"real_features": local_path(args.real) if args.real else None, "precision_recall": args.prdc,
            "kid": args.kid, "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size}
