"""Metrics as the paper computed them: Inception features, FID, IS, KID, precision/recall/density/coverage.

    extractor = FeatureExtractor('inception-v3-compat', weights=None)   # or 'nvidia' for EDM rows
    acc = FeatureAccumulator(extractor)
    for seeds, images in batches: acc.update(images, index=seeds)       # each rank its own share
    result = evaluate(acc, 'ref.npz')                                     # {'fid', 'is_mean', 'is_std', ...}
"""
from neon.metrics.accumulate import FeatureAccumulator, Summary, summarize_images
from neon.metrics.evaluate import evaluate
from neon.metrics.features import DETECTORS, FeatureExtractor, to_nchw_uint8
from neon.metrics.frechet import frechet_distance, gaussian_from_features
from neon.metrics.inception_score import inception_score
from neon.metrics.kid import kid
from neon.metrics.prdc import prdc
from neon.metrics.stats import Stats, check_detector, load_real_features, load_stats, save_stats

__all__ = ["DETECTORS", "FeatureAccumulator", "FeatureExtractor", "Stats", "Summary", "check_detector", "evaluate",
           "frechet_distance", "gaussian_from_features", "inception_score", "kid", "load_real_features",
           "load_stats", "prdc", "save_stats", "summarize_images", "to_nchw_uint8"]
