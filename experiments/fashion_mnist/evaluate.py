"""Metrics of one image set and the paired summary over evaluation seeds.

Every (arm, w) model samples the same evaluation seeds with the same labels, so for seed block b the difference
FD_b(w) − FD_b(0) compares the models on identical noise: the sampling noise common to both cancels, and what
remains is spread across blocks, which is the std we report.
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


def summarize_arm(per_w: dict[float, list[dict]], base: list[dict]) -> list[dict]:
    """per_w: {w: [metrics of block 0, 1, …]} (w = 0 included or not), base: θr's blocks.
    -> rows sorted by w: mean ± std of each metric across blocks, and of the paired difference to w = 0."""
    rows = []
    for w in sorted(set(per_w) | {0.0}):
        blocks = base if w == 0 else per_w[w]
        row = {"w": w, "blocks": len(blocks)}
        for m in METRICS:
            values = [b[m] for b in blocks]
            diffs = [b[m] - b0[m] for b, b0 in zip(blocks, base)]
            row[m] = dict(zip(("mean", "std"), mean_std(values)))
            row[m + "_diff"] = dict(zip(("mean", "std"), mean_std(diffs)))
            row[m + "_values"] = values
        rows.append(row)
    return rows


def best_row(rows: list[dict], metric: str = "classifier_fd") -> dict:
    """The w with the lowest mean FD, and how its paired improvement over w = 0 compares with its std."""
    best = min(rows, key=lambda r: r[metric]["mean"])
    d = best[metric + "_diff"]
    improvement = -d["mean"]
    ratio = improvement / d["std"] if d["std"] > 0 else (float("inf") if improvement > 0 else 0.0)
    return {"w": best["w"], "fd": best[metric]["mean"], "improvement": improvement, "improvement_std": d["std"],
            "ratio": ratio if best["w"] != 0 else 0.0}
