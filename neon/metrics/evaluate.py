"""One call from images (or their accumulated features) to the paper's numbers: FID, IS, PRDC and KID.

The sweep samples batch by batch, feeds `FeatureAccumulator.update`, then calls `evaluate(acc, ref)`;
`neon fid` does the same from an image set on disk.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from neon.errors import NeonError
from neon.metrics.accumulate import FeatureAccumulator, Summary
from neon.metrics.frechet import frechet_distance
from neon.metrics.kid import SUBSET_SIZE, SUBSETS
from neon.metrics.kid import kid as kid_metric
from neon.metrics.prdc import prdc
from neon.metrics.stats import Stats, load_stats


def _real_features(real) -> torch.Tensor:
    """Real features for PRDC from a Stats / stats file with 'features', a Summary, or an (N, D) array."""
    if isinstance(real, (str, os.PathLike)):
        real = load_stats(real)
    if isinstance(real, (Stats, Summary)):
        if real.features is None:
            raise NeonError("precision/recall needs real features: make the real statistics with "
                            "`neon stats --features`, or give the real images")
        real = real.features
    return torch.as_tensor(np.asarray(real)) if not isinstance(real, torch.Tensor) else real


def evaluate(source: FeatureAccumulator | Summary | Iterable,
             ref: str | os.PathLike | Stats | None,
             *,
             extractor=None,                 # needed only when `source` is an iterable of image batches
             inception_score: bool = True,   # IS (None when the detector has no real logits)
             splits: int = 10,               # IS splits (torch-fidelity: 10)
             real=None,                      # real features (or stats with features) for PRDC / KID
             k: int = 5,                     # PRDC neighbourhood (the paper: 5)
             precision_recall: bool = True,  # PRDC when `real` is given
             kid: bool = False,              # KID against `real`
             kid_subsets: int = SUBSETS,
             kid_subset_size: int = SUBSET_SIZE) -> dict:
    """{'fid', 'is_mean', 'is_std', 'num_images'}, with 'precision', 'recall', 'density', 'coverage' when `real`
    is given (unless precision_recall=False), and 'kid_mean', 'kid_std', 'kid_subset_size' when `kid`.
    When IS cannot be computed, is_mean and is_std are None and 'is_unavailable' says why.

    Collective under torchrun when given an accumulator or batches (it gathers features); every rank gets
    the same dict. `fid` is None when `ref` is None.
    """
    if kid and real is None:
        raise NeonError("KID needs real features: make the real statistics with `neon stats --features`")
    if isinstance(source, Summary):
        summary = source
    else:
        if not isinstance(source, FeatureAccumulator):
            if extractor is None:
                raise NeonError("evaluate: give an extractor to compute features of image batches")
            acc = FeatureAccumulator(extractor, keep_features=real is not None, logits=inception_score)
            for images in source:
                acc.update(images)
            source = acc
        summary = source.finish()
    out: dict = {"num_images": summary.count, "fid": None}
    if ref is not None:
        ref = ref if isinstance(ref, Stats) else load_stats(ref)
        if ref.dim != summary.mu.shape[0]:
            raise NeonError(f"reference statistics are {ref.dim}-d but the detector gives {summary.mu.shape[0]}-d "
                            "features")
        out["fid"] = frechet_distance(summary.mu, summary.sigma, ref.mu, ref.sigma)
    if inception_score:
        out["is_mean"], out["is_std"] = summary.inception_score(splits)
        if out["is_mean"] is None:  # say why rather than report a number from meaningless logits
            out["is_unavailable"] = ("no logits: pool3-only detector weights (e.g. 'fid-helper')"
                                     if summary.logits is None else f"{summary.count} images < {splits} splits")
    precision_recall = precision_recall and real is not None
    if precision_recall or kid:
        if summary.features is None:
            raise NeonError("precision/recall, KID: the accumulator was made without keep_features=True")
        real = _real_features(real)
        # On the detector's device when there is one: 50k × 50k distances or 100 kernel triples are GPU work.
        device = getattr(extractor or getattr(source, "extractor", None), "device", None) or real.device
        if precision_recall:
            out.update(prdc(real.to(device), summary.features.to(device), k=k))
        if kid:
            out.update(kid_metric(real, summary.features, subsets=kid_subsets, subset_size=kid_subset_size,
                                  device=device))
    return out
