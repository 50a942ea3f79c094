"""Metrics of one image set, the choice of w (or ω) on the validation range, and the paired summary over the
report ranges.

Every model samples the same seeds with the same labels, so for report range b the difference FD_b(model) −
FD_b(θr) compares the models on identical noise: the sampling noise common to both cancels, and what remains is
spread across ranges, which is the std we report. w and ω are chosen on a separate validation range (where every
grid point is measured), so the reported improvement is not the minimum of several noisy estimates taken on the
images it is judged on.
"""
from __future__ import annotations

import numpy as np

from experiments.fashion_mnist.classifier import FeatureCNN, predict
from neon.metrics import frechet_distance, gaussian_from_features

METRICS = ("classifier_fd", "pixel_fd")


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float64 (N, H·W·C) in [0, 1]: the space of "pixel FD"."""
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def reference_statistics(net: FeatureCNN, images: np.ndarray) -> dict[str, np.ndarray]:
    """Gaussians of the reference set (the test split) in classifier-feature and pixel space."""
    feats, _ = predict(net, images)
    mu_c, sigma_c = gaussian_from_features(feats)
    mu_p, sigma_p = gaussian_from_features(pixels(images))
    return {"classifier_mu": mu_c, "classifier_sigma": sigma_c, "pixel_mu": mu_p, "pixel_sigma": sigma_p}


def image_set_metrics(net: FeatureCNN, images: np.ndarray, ref: dict[str, np.ndarray],
                      labels: np.ndarray | None = None) -> dict[str, float]:
    """Classifier FD and pixel FD of `images` (uint8 NHWC) against `ref`, plus descriptive facts: the trace of
    the feature covariance (spread), the classifier's mean confidence, agreement with the conditioning labels,
    and the mean per-image pixel std."""
    feats, probs = predict(net, images)
    mu, sigma = gaussian_from_features(feats)
    mu_p, sigma_p = gaussian_from_features(pixels(images))
    out = {"classifier_fd": frechet_distance(mu, sigma, ref["classifier_mu"], ref["classifier_sigma"]),
           "pixel_fd": frechet_distance(mu_p, sigma_p, ref["pixel_mu"], ref["pixel_sigma"]),
           "feature_trace": float(np.trace(sigma)),
           "confidence": float(probs.max(1).mean()),
           "pixel_std": float(pixels(images).std(1).mean())}
    if labels is not None:
        out["label_accuracy"] = float((probs.argmax(1) == labels).mean())
    return out


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_row(report: list[dict], base: list[dict]) -> dict:
    """report, base: [metrics of report range 0, 1, …] of a model and of θr (the same seeds range by range).
    -> mean ± std of each metric across ranges, and of the per-range difference to θr (the paired Δ)."""
    row = {"ranges": len(report)}
    for m in METRICS:
        values = [b[m] for b in report]
        diffs = [b[m] - b0[m] for b, b0 in zip(report, base, strict=True)]
        row[m] = dict(zip(("mean", "std"), mean_std(values)))
        row[m + "_diff"] = dict(zip(("mean", "std"), mean_std(diffs)))
        row[m + "_values"] = values
    return row


def sweep_rows(points: dict[float, dict], base: dict, axis: str = "w", zero: dict | None = None) -> list[dict]:
    """points: {x: metrics on the validation range} for the grid values x of one sweep (w or ω); base: θr's
    validation metrics; zero: the metrics of x = 0 (default θr's) unless the grid evaluated x = 0 itself.
    -> rows sorted by x: each metric on the validation range and its difference to θr there."""
    rows = []
    for x in sorted(set(points) | {0.0}):
        p = points.get(x, base if zero is None else zero)
        rows.append({axis: x, **{m: p[m] for m in METRICS}, **{m + "_diff": p[m] - base[m] for m in METRICS}})
    return rows


def choose(rows: list[dict], axis: str = "w", metric: str = "classifier_fd") -> float:
    """The grid value with the lowest FD on the validation range (ties go to the smaller |x|). The report
    ranges play no part in it."""
    return min(rows, key=lambda r: (r[metric], abs(r[axis])))[axis]


def improvement(row: dict, metric: str = "classifier_fd") -> dict:
    """A `paired_row`'s improvement over θr (−mean Δ), its std across report ranges, and their ratio."""
    d = row[metric + "_diff"]
    gain = -d["mean"]
    ratio = gain / d["std"] if d["std"] > 0 else (float("inf") if gain > 0 else 0.0)
    return {"improvement": gain, "improvement_std": d["std"], "ratio": ratio}
