"""Reference statistics files: `.npz` with float64 `mu` (D,) and `sigma` (D, D).

This is the layout of EDM's fid-refs and of the ADM reference batches (which also carry images and spatial
statistics; only `mu` and `sigma` are read). Files written here may add `count` (number of images),
`features` (float32 (N, D) pool features, for precision/recall against this set) and `detector` (the network
that made them: statistics of one detector are refused where another measures); other readers ignore them.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from neon import paths
from neon.checkpoint import atomic_open
from neon.errors import NeonError
from neon.images import read_npz
from neon.metrics.frechet import check_gaussian

MIN_COUNT = 2  # a covariance needs two samples
# Feature widths: Inception 2048, DINOv2 ViT-L 1024 (ViT-g 1536). Statistics of more are no detector's, and their
# sigma (D, D) alone would take D² doubles: each array is refused, from its header, past what MAX_DIM allows.
MAX_DIM = 4096
MAX_BYTES = {"mu": MAX_DIM * 8, "sigma": MAX_DIM * MAX_DIM * 8, "count": 8, "detector": 4 * 256}


@dataclasses.dataclass
class Stats:
    """A Gaussian summary of a feature set: mu (D,) and sigma (D, D) float64; count and features when known."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    features: np.ndarray | None = None  # (N, D) float32, only when saved for precision/recall
    detector: str | None = None         # the detector that made them, when the file records it

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def check_count(count: int | None, what: str) -> None:
    if count is not None and count < MIN_COUNT:
        raise NeonError(f"{what}: computed from {count} image(s); at least {MIN_COUNT} are needed")


def load_stats(path: str | os.PathLike, dim: int | None = None) -> Stats:
    """Read `mu`, `sigma` (and `count`, `features` if present); refuse a missing file, missing keys, arrays past
    MAX_BYTES (from their headers), wrong shapes, non-finite values, a count below 2, or a feature dimension other
    than `dim`."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise NeonError(f"statistics file not found: {path}")
    paths.input_file(str(path), "statistics file")
    arrays = read_npz(str(path), required=("mu", "sigma"), optional=("count", "features", "detector"),
                      max_bytes=MAX_BYTES)
    mu, sigma, features = arrays["mu"], arrays["sigma"], arrays.get("features")
    if "count" in arrays and arrays["count"].size != 1:
        raise NeonError(f"{path}: 'count' has shape {arrays['count'].shape}, expected a single number")
    count = int(arrays["count"]) if "count" in arrays else None
    mu, sigma = check_gaussian(mu, sigma, str(path))
    check_count(count, str(path))
    if dim is not None and mu.shape[0] != dim:
        raise NeonError(f"{path}: statistics are {mu.shape[0]}-d but the detector gives {dim}-d features")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise NeonError(f"{path}: 'features' has shape {features.shape}, expected (N, {mu.shape[0]})")
    detector = arrays.get("detector")
    if detector is not None and (detector.dtype.kind != "U" or detector.size != 1):
        raise NeonError(f"{path}: 'detector' must be one name, got {detector.dtype} {detector.shape}")
    return Stats(mu, sigma, count, features, None if detector is None else str(detector))


def check_detector(stats: Stats, detector: str, path) -> None:
    """Refuse statistics that record another detector than the one measuring: their FID would compare two
    networks' features. Files that record none (EDM's fid-refs, the ADM batches) are taken as they are."""
    if stats.detector is not None and stats.detector != detector:
        raise NeonError(f"{path}: statistics of the {stats.detector!r} detector, but the images are measured with "
                        f"{detector!r} (make them with `neon stats --detector {detector}`)")


def save_stats(path: str | os.PathLike, mu, sigma, count: int | None = None, features=None,
               detector: str | None = None) -> Path:
    """Write mu, sigma as float64 (plus count / float32 features / the detector's name if given) atomically: temp
    file, then rename."""
    mu, sigma = check_gaussian(mu, sigma, "statistics to save")
    check_count(count, "statistics to save")
    arrays = {"mu": mu, "sigma": sigma}
    if count is not None:
        arrays["count"] = np.int64(count)
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    if detector is not None:
        arrays["detector"] = np.array(str(detector))
    with atomic_open(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def load_real_features(path: str | os.PathLike, dim: int | None = None, min_count: int = MIN_COUNT) -> np.ndarray:
    """The real images' pool features (N, D) float32 from a `neon stats --features` file, for precision/recall
    and KID: refused, in one line naming the file, when missing, without 'features', non-finite, of another
    dimension than `dim`, or holding fewer than `min_count` rows."""
    stats = load_stats(path, dim=dim)
    if stats.features is None:
        raise NeonError(f"{path}: holds no 'features' (make it with `neon stats --images REAL --out FILE --features`)")
    features = stats.features
    if features.shape[0] < min_count:
        raise NeonError(f"{path}: 'features' holds {features.shape[0]} rows, at least {min_count} are needed")
    if not np.issubdtype(features.dtype, np.floating) or not np.isfinite(features).all():
        raise NeonError(f"{path}: 'features' must be finite floating-point numbers")
    return features.astype(np.float32, copy=False)
