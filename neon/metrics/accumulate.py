"""Streaming feature statistics: extract batch by batch on every rank, gather once at the end.

    acc = FeatureAccumulator(extractor)
    for seeds, images in my_batches:          # this rank's share, uint8 images
        acc.update(images, index=seeds)       # index: each image's global position (e.g. its seed)
    summary = acc.finish()                    # collective: every rank gets the same Summary

Features are gathered across torchrun ranks (neon.dist.all_gather_cat) and put back in `index` order, so the
result — IS included, whose splits depend on order — does not depend on the number of processes.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from neon import dist
from neon.errors import NeonError
from neon.images import FolderImages, NpzImages, open_images
from neon.metrics.features import FeatureExtractor
from neon.metrics.frechet import gaussian_from_features
from neon.metrics.inception_score import inception_score
from neon.metrics.stats import Stats


@dataclasses.dataclass
class Summary:
    """Everything the metrics need from one image set, on every rank."""
    mu: np.ndarray                     # (D,) float64
    sigma: np.ndarray                  # (D, D) float64, unbiased
    count: int                         # N images
    features: torch.Tensor | None      # (N, D) float32 pool features (kept only when asked, for PRDC)
    logits: torch.Tensor | None        # (N, 1008) float32 unbiased logits (None: the detector has none)

    def stats(self, with_features: bool = False) -> Stats:
        feats = self.features.numpy() if with_features and self.features is not None else None
        return Stats(self.mu, self.sigma, self.count, feats)

    def inception_score(self, splits: int = 10) -> tuple[float, float] | tuple[None, None]:
        """(mean, std), or (None, None) when there are no real logits or fewer images than splits."""
        if self.logits is None or self.count < splits:
            return None, None
        return inception_score(self.logits, splits=splits)


class FeatureAccumulator:
    """Collects pool features (and logits) of uint8 image batches on this rank; `finish()` (collective: every
    rank calls it, also a rank that got no images) summarises them."""

    def __init__(self,
                 extractor: FeatureExtractor,
                 keep_features: bool = False,  # keep (N, D) features in the Summary (precision/recall)
                 logits: bool = True,          # keep logits for IS (if the extractor gives them)
                 covariance: str = "unbiased"):   # how sigma is estimated (neon.metrics.frechet.COVARIANCES)
        self.extractor = extractor
        self.covariance = covariance
        self.keep_features = keep_features
        self.want_logits = logits and extractor.logits
        self._pool, self._logits, self._index = [], [], []

    def update(self, images, index=None) -> None:
        """Add a batch of uint8 images (B, H, W, 3) or (B, 3, H, W); `index` (B,) are their global positions
        (non-negative, unique across ranks), or None for rank-then-arrival order."""
        feats = self.extractor(images)
        b = feats["pool"].shape[0]
        if index is None:
            idx = torch.full((b,), -1, dtype=torch.int64)
        else:
            idx = torch.as_tensor(index if isinstance(index, torch.Tensor) else np.asarray(index)).cpu()
        if idx.shape != (b,) or (index is not None and bool((idx < 0).any())):
            raise NeonError(f"index: expected {b} non-negative positions, got shape {tuple(idx.shape)}")
        self._pool.append(feats["pool"].float().cpu())
        if self.want_logits:
            self._logits.append(feats["logits_unbiased"].float().cpu())
        self._index.append(idx.to(torch.int64))

    def _gathered(self, parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        return dist.all_gather_cat(torch.cat(parts) if parts else empty)

    def finish(self) -> Summary:
        """Gather every rank's features (collective), restore index order, compute mu/sigma in float64."""
        dim = self.extractor.dim
        pool = self._gathered(self._pool, torch.zeros(0, dim))
        logits = self._gathered(self._logits, torch.zeros(0, 1008)) if self.want_logits else None
        index = self._gathered(self._index, torch.zeros(0, dtype=torch.int64))
        self._pool, self._logits, self._index = [], [], []
        if len(index) and bool((index >= 0).all()):
            order = torch.argsort(index)
            if bool((index[order][1:] == index[order][:-1]).any()):
                raise NeonError("index: the same position was given to more than one image")
            pool = pool[order]
            logits = logits[order] if logits is not None else None
        elif bool((index >= 0).any()):
            raise NeonError("index: give it for every batch on every rank, or for none")
        mu, sigma = gaussian_from_features(pool.to(self.extractor.device), self.covariance)
        return Summary(mu, sigma, int(pool.shape[0]), pool if self.keep_features else None, logits)


def summarize_images(path, extractor: FeatureExtractor, batch: int = 64, num: int | None = None,
                     keep_features: bool = False, logits: bool = True, progress: bool = True) -> Summary:
    """Features of the first `num` images of an image set on disk (.npz or folder; its path, or the set already
    opened by `open_images`), each rank extracting every world_size-th image; collective, every rank gets the
    Summary."""
    from tqdm import tqdm

    images = path if isinstance(path, (NpzImages, FolderImages)) else open_images(path)
    path = images.path
    n = len(images) if num is None else num
    if n > len(images):
        raise NeonError(f"{path}: {n} images asked for, but it holds {len(images)}")
    if n < 2:
        raise NeonError(f"{path}: need at least 2 images to compute statistics, got {n}")
    acc = FeatureAccumulator(extractor, keep_features=keep_features, logits=logits)
    mine = dist.shard(range(n))
    with tqdm(total=len(mine), unit="img", desc=os.path.basename(path), disable=not progress or not dist.is_main(),
              dynamic_ncols=True) as bar:
        for start in range(0, len(mine), batch):
            index = mine[start:start + batch]
            acc.update(images.take(index), index=index)
            bar.update(len(index))
    return acc.finish()
